"""Capture: turn a module and example inputs into a GraphModule (torch.export or torch.fx)."""
from __future__ import annotations

import contextlib
import os
import re
import traceback

import torch
import torch.fx as fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import CaptureError
from .call_spec import CallSpec


@contextlib.contextmanager
def module_mode(module: torch.nn.Module, training: bool):
    """Within the block `module` and every submodule is in train (`training`) or eval mode; each gets
    its own mode back afterwards (torch.export bakes the mode into the graph, so tracing needs it)."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _dynamic_spec(x):
    """Every dimension of size > 1 AUTO (dynamic where the program allows). Size-1 dims stay static
    (export would specialize them anyway, with a warning); `static_sizes` records every fixed size,
    so that a call of other sizes is captured again instead of failing a guard."""
    if isinstance(x, torch.Tensor):
        return {i: Dim.AUTO for i in range(x.dim()) if x.shape[i] != 1} or None
    return None


def static_sizes(gm: fx.GraphModule) -> tuple:
    """Per graph input tensor, the ((dim, size), ...) the captured program holds fixed (none for fx)."""
    out = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        val = ph.meta.get("val")
        shape = getattr(val, "shape", None) if isinstance(val, torch.Tensor) else None
        out.append(tuple((d, int(s)) for d, s in enumerate(shape) if isinstance(s, int)) if shape is not None else ())
    return tuple(out)


def serves(gm: fx.GraphModule, tensors) -> bool:
    """Whether the captured program `gm` accepts these call tensors' sizes (its fixed sizes match)."""
    fixed = gm.meta.get("static_sizes", ())
    return all(t.dim() > d and t.shape[d] == s for t, dims in zip(tensors, fixed) for d, s in dims)


class _FlatCall(torch.nn.Module):
    """Calls `mod` with a fixed call structure; its forward takes only the tensors, positionally."""

    def __init__(self, mod: torch.nn.Module, spec: CallSpec):
        super().__init__()
        self.mod = mod
        self.spec = spec

    def call(self, *tensors):
        args, kwargs = self.spec.unflatten(tensors)
        return last_state_only(self.mod(*args, **kwargs), kwargs)


def last_state_only(out, kwargs: dict):
    """`out` without per-layer states: a module its model calls with output_hidden_states=True
    (DeBERTa's encoder, which then reads only the last entry) returns `hidden_states` with every entry
    but the last None, and `attentions` all None. A reversible stack keeps no layer's state, and a
    graph returning them could not be made reversible; a user's own per-layer request is refused
    earlier, by name (`conversion.refuse_per_layer_outputs`)."""
    if not (kwargs.get("output_hidden_states") or kwargs.get("output_attentions")) or not hasattr(out, "keys"):
        return out
    states, attentions = out.get("hidden_states"), out.get("attentions")
    if isinstance(states, (tuple, list)) and states:
        out["hidden_states"] = (None,) * (len(states) - 1) + (states[-1],)
    if isinstance(attentions, (tuple, list)):
        out["attentions"] = (None,) * len(attentions)
    return out


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
    # Contiguous copies: an exported program's guards on a view's strides fail at later calls; a
    # program traced on contiguous inputs serves views and odd strides.
    tensors = [x.contiguous() for x in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(x, torch.Tensor)]
    tried = []
    order = {"auto": ("export", "fx"), "export": ("export",), "fx": ("fx",)}[mode]
    for how in order:
        try:
            gm = _export(flat, tensors) if how == "export" else _fx(flat, tensors)
            gm.meta = {"meft_pass": f"capture ({'torch.export' if how == 'export' else 'torch.fx'})",
                       "static_sizes": static_sizes(gm) if how == "export" else ()}
            return gm, spec
        except Exception as e:  # noqa: BLE001 - report every tracer's failure together
            msg = str(e).strip().splitlines()
            head = msg[0] if msg else type(e).__name__
            where = _culprit(e)
            tried.append(f"{'torch.export.export(strict=False)' if how == 'export' else 'torch.fx.symbolic_trace'} failed: "
                         f"{type(e).__name__}: {head[:400]}" + (f"\n    at {where}" if where else ""))
    experts = getattr(getattr(module, "config", None), "_experts_implementation", None) == "eager"
    raise CaptureError(
        f"[capture] could not trace {type(module).__name__}{spec.describe()}. What to try: "
        + ("its mixture-of-experts layers use the 'eager' experts, a Python loop over the experts the batch hits "
           "(data-dependent): load the model with experts_implementation='grouped_mm' (fp32/bf16) or 'batched_mm'; "
           if experts else "")
        + "pass example_inputs= that the model's "
        "forward accepts (keyword dict or positional tuple); avoid Python control flow that depends on tensor values; "
        "for a transformers decoder set use_cache=False; or choose MEFTConfig(capture='export'|'fx') to see one tracer's error",
        tried)


_RAISED_AT = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
