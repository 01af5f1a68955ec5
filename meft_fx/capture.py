"""Capture: turn a module and example inputs into a GraphModule (torch.export or torch.fx)."""
from __future__ import annotations

import inspect
import os
import re
import sys
import time
import traceback

import torch
import torch.fx as fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import CaptureError


def is_transformers_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _forward_params(model) -> dict:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def default_inputs(model) -> dict:
    """Example inputs for a transformers model that was given none (its dummy inputs, cleaned up).

    `dummy_inputs` is not always right for the model (ViT's are token ids, T5EncoderModel's include
    decoder inputs): keys the forward does not take are dropped, image models get `pixel_values`
    from their config, and an `attention_mask` is added where the forward takes one.
    """
    params = _forward_params(model)
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    out = {}
    if main == "pixel_values":
        c = getattr(cfg, "num_channels", 3)
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        g = torch.Generator().manual_seed(0)
        out["pixel_values"] = torch.randn(2, c, size, size, generator=g).to(dtype)
        return out
    try:
        dummy = dict(model.dummy_inputs)
    except Exception:
        vocab = getattr(cfg, "vocab_size", 100) or 100
        dummy = {"input_ids": torch.tensor([[7, 6, 0, 0, 1], [1, 2, 3, 0, 0], [0, 0, 0, 4, 5]]) % vocab}
    for k, v in dummy.items():
        if k in params:
            out[k] = v
    if "input_ids" in out and "attention_mask" in params and "attention_mask" not in out:
        # Padded like a real batch: some models skip the mask when it is all ones, and a first capture
        # without a mask would be captured again at the first padded batch.
        mask = torch.ones_like(out["input_ids"])
        mask[-1, -1:] = 0
        out["attention_mask"] = mask
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params and "decoder_input_ids" not in out:
        ids = out["input_ids"]
        out["decoder_input_ids"] = ids[:, :-1].clone() if ids.shape[1] > 2 else ids.clone()
    if not out:
        raise ValueError(f"{type(model).__name__}: could not build example inputs from dummy_inputs; pass example_inputs=")
    return out


def normalize_inputs(model, example_inputs) -> tuple[tuple, dict]:
    """Accept a dict (keyword arguments), a tuple/list (positional), a single tensor, or None."""
    if example_inputs is None:
        if is_transformers_model(model):
            return (), default_inputs(model)
        raise ValueError(f"{type(model).__name__} is not a transformers model: pass example_inputs= "
                         "(a dict of keyword arguments or a tuple of positional arguments for its forward)")
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys") and hasattr(example_inputs, "items"):
        return (), dict(example_inputs.items())
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"example_inputs must be a dict, a tuple, a tensor or None, got {type(example_inputs).__name__}")


def _dynamic_spec(x):
    if isinstance(x, torch.Tensor):
        # Size-1 dimensions (e.g. the head axis of a [B, 1, T, T] mask) stay static: broadcasting needs them.
        return {i: Dim.AUTO for i in range(x.dim()) if x.shape[i] != 1} or None
    return None


class _Slot:
    """Marks where a tensor goes in a flattened call."""

    def __repr__(self) -> str:
        return "<tensor>"


SLOT = _Slot()


def _leaf_key(v):
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return ("v", v)
    return ("id", type(v).__name__, id(v))


class CallSpec:
    """The structure of one call `module(*args, **kwargs)`: where the tensors go, and everything else.

    Two calls with the same `key` run the same captured graph; the graph takes the tensors only.
    """

    def __init__(self, args: tuple, kwargs: dict):
        leaves, self.treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self.template = [SLOT if isinstance(x, torch.Tensor) else x for x in leaves]
        self.slots = [i for i, x in enumerate(self.template) if x is SLOT]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        self.key = CallSpec.key_of(self.treespec, leaves)
        self.names = [f"in_{i}" for i in range(len(tensors))]

    @staticmethod
    def key_of(treespec, leaves) -> tuple:
        return (str(treespec), tuple(("t", x.dim(), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else _leaf_key(x)
                                     for x in leaves))

    @staticmethod
    def flatten(args: tuple, kwargs: dict):
        """(tensors, key) of a call."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        return [x for x in leaves if isinstance(x, torch.Tensor)], CallSpec.key_of(spec, leaves)

    def unflatten(self, tensors) -> tuple[tuple, dict]:
        leaves = list(self.template)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.treespec)

    def describe(self) -> str:
        args, kwargs = pytree.tree_unflatten(list(self.template), self.treespec)
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return f"({', '.join(parts)})"


class _FlatCall(torch.nn.Module):
    """Calls `mod` with a fixed call structure; its forward takes only the tensors, positionally."""

    def __init__(self, mod: torch.nn.Module, spec: CallSpec):
        super().__init__()
        self.mod = mod
        self.spec = spec

    def call(self, *tensors):
        args, kwargs = self.spec.unflatten(tensors)
        return self.mod(*args, **kwargs)


def _flat_module(module, spec: CallSpec) -> torch.nn.Module:
    names = ", ".join(spec.names)
    ns: dict = {}
    exec(f"def forward(self{', ' if names else ''}{names}):\n    return self.call({names})\n", ns)
    cls = type(f"{type(module).__name__}Call", (_FlatCall,), {"forward": ns["forward"]})
    return cls(module, spec)


def _export(flat, tensors) -> fx.GraphModule:
    shapes = tuple(_dynamic_spec(t) for t in tensors)
    with torch.random.fork_rng():
        ep = torch.export.export(flat, tuple(tensors), dynamic_shapes=shapes, strict=False)
    exported = ep.module()
    # A plain GraphModule: the exported-program module refuses train()/eval().
    return fx.GraphModule(exported, exported.graph, class_name=type(flat.mod).__name__ + "Graph")


def _fx(flat, tensors) -> fx.GraphModule:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(flat)
    with torch.random.fork_rng(), torch.no_grad():
        ShapeProp(gm).propagate(*tensors)
    return gm


def capture(module: torch.nn.Module, args: tuple, kwargs: dict, mode: str = "auto"):
    """Trace `module(*args, **kwargs)`; return (GraphModule taking the call's tensors, CallSpec).

    The GraphModule shares the module's parameters. mode "export": torch.export (non-strict, every
    tensor dimension dynamic where the program allows, train mode kept). "fx":
    torch.fx.symbolic_trace plus shape propagation. "auto": export, then fx.
    """
    spec = CallSpec(args, kwargs)
    flat = _flat_module(module, spec)
    tensors = [x for x in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(x, torch.Tensor)]
    tried = []
    order = {"auto": ("export", "fx"), "export": ("export",), "fx": ("fx",)}[mode]
    for how in order:
        try:
            gm = _export(flat, tensors) if how == "export" else _fx(flat, tensors)
            gm.meta = {"meft_pass": f"capture ({'torch.export' if how == 'export' else 'torch.fx'})"}
            return gm, spec
        except Exception as e:  # noqa: BLE001 - report every tracer's failure together
            msg = str(e).strip().splitlines()
            head = msg[0] if msg else type(e).__name__
            where = _culprit(e)
            tried.append(f"{'torch.export.export(strict=False)' if how == 'export' else 'torch.fx.symbolic_trace'} failed: "
                         f"{type(e).__name__}: {head[:400]}" + (f"\n    at {where}" if where else ""))
    raise CaptureError(
        f"[capture] could not trace {type(module).__name__}{spec.describe()}. What to try: pass example_inputs= that the model's "
        f"forward accepts (keyword dict or positional tuple); avoid Python control flow that depends on tensor values; "
        f"for a transformers decoder set use_cache=False; or choose MEFTConfig(capture='export'|'fx') to see one tracer's error",
        tried)


_RAISED_AT = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _culprit(e: BaseException) -> str:
    """`file:line in function: code` of the model's source line the tracer failed on ("" if unknown)."""
    m = _RAISED_AT.search(str(e))
    if m:
        return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_LIBRARY_DIRS) and not f.filename.startswith("<")]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return ""


class Progress:
    """Prints timed progress lines to stderr when enabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[meft_fx {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
