"""`convert`: capture → analyze → rewrite → install. The one entry point of meft_fx."""
from __future__ import annotations

import copy
import sys
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn

import passes
from .adapters import Adapter
from .capture import CallSpec, Progress, capture, is_transformers_model, normalize_inputs
from .config import MEFTConfig
from .coupling import ReversibleStack
from .errors import ConversionError


def snapshot(gm: fx.GraphModule, made_by: str) -> fx.GraphModule:
    """A copy of `gm`'s program (sharing its parameters) labelled with the pass that made it."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    g._codegen = gm.graph._codegen
    snap = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    snap.meta = {"meft_pass": made_by}
    return snap


def rewrite(gm: fx.GraphModule, config: MEFTConfig, progress=None, adapters: dict | None = None):
    """Run the passes on a captured GraphModule. Returns (rewritten gm, analysis, programs).

    `programs` is an ordered dict: the captured graph and the graph after each pass (printable).
    `adapters` is the adapter registry shared by every capture of the same module.
    """
    progress = progress or (lambda msg: None)
    adapters = {} if adapters is None else adapters
    programs = OrderedDict(captured=snapshot(gm, gm.meta.get("meft_pass", "capture")))
    gm = passes.hoist_shape_queries(gm)
    programs["hoist_shape_queries"] = snapshot(gm, "hoist_shape_queries")
    gm = passes.dropout_to_modules(gm)
    programs["dropout_to_modules"] = snapshot(gm, "dropout_to_modules")
    progress("finding the residual stream")
    analysis = passes.group_layers(passes.find_residual_units(gm))
    if not analysis.stacks:
        return gm, analysis, programs
    gm = passes.insert_adapters(gm, analysis, config, adapters)
    programs["insert_adapters"] = snapshot(gm, "insert_adapters")
    progress(f"building couplings for {sum(len(s.layers) for s in analysis.stacks)} layers")
    gm = passes.build_couplings(gm, analysis, config, adapters)
    programs["build_couplings"] = snapshot(gm, "build_couplings")
    return gm, analysis, programs


class ConvertedModule(nn.Module):
    """Stands in for the module that held a transformer stack; called exactly like it.

    It runs the rewritten graph captured for the call's structure (which arguments are tensors or
    None, flags). A call with a new structure (say, a padding mask where the first call had none)
    is captured and rewritten once more, reusing the same adapters and pretrained parameters,
    like torch.compile recompiling on a guard failure.
    """

    def __init__(self, original: nn.Module, gm: fx.GraphModule, spec, config: MEFTConfig, adapters: dict,
                 unmatched: list, owner: str):
        super().__init__()
        self.graph_module = gm
        self.original_class = type(original).__name__
        self.owner = owner
        self.meft_unmatched = list(unmatched)
        self.__dict__["_original"] = original
        self.__dict__["_variants"] = {spec.key: gm}
        self.__dict__["_config"] = config
        self.__dict__["_adapters"] = adapters

    def __getattr__(self, name: str):
        # Attributes of the original module (embeddings, config, helper methods) stay reachable.
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)

    @property
    def variants(self) -> int:
        """How many call structures have been captured."""
        return len(self._variants)

    def forward(self, *args, **kwargs):
        tensors, key = CallSpec.flatten(args, kwargs)
        gm = self._variants.get(key)
        if gm is None:
            gm = self._recapture(args, kwargs, key)
        if gm is not self.graph_module and gm.training != self.training:
            gm.train(self.training)
        return gm(*tensors)

    @torch._disable_dynamo  # under torch.compile: capture eagerly, behind a graph break
    def _recapture(self, args, kwargs, key):
        progress = Progress(self._config.verbose)
        progress(f"{self.owner or self.original_class}: new call structure, capturing again")
        original = self._original
        mode = original.training
        original.train()
        try:
            gm, spec = capture(original, args, kwargs, self._config.capture)
        finally:
            original.train(mode)
        gm, analysis, programs = rewrite(gm, self._config, progress, self._adapters)
        if not analysis.stacks:
            raise ConversionError(f"{self.owner or self.original_class}: called with a new argument structure "
                                  f"{spec.describe()}, and no stack was found when capturing it", analysis.rejected)
        gm.meft_programs = programs
        _freeze_like(gm, self.graph_module)
        from .compile import compile_like
        compile_like(gm, self.graph_module)  # stacks of a meft_fx.compile'd model: the new ones too
        self._variants[key] = gm
        return gm


def _freeze_like(gm: nn.Module, reference: nn.Module) -> None:
    trainable = {id(p) for p in reference.parameters() if p.requires_grad}
    for p in gm.parameters():
        p.requires_grad_(id(p) in trainable)


def _record_calls(model: nn.Module, paths, args, kwargs) -> dict:
    seen, hooks = {}, []
    for p in paths:
        def hook(mod, a, k, p=p):
            seen.setdefault(p, (a, k))
        hooks.append(model.get_submodule(p).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), torch.random.fork_rng():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _freeze(model: nn.Module, config: MEFTConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Adapter):
            m.requires_grad_(True)
    base = getattr(model, "base_model", None)
    if config.train_head and isinstance(base, nn.Module) and base is not model:
        frozen = {id(p) for p in base.parameters()}
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(out_emb, nn.Module):
            frozen |= {id(p) for p in out_emb.parameters()}
        for p in model.parameters():
            if id(p) not in frozen:
                p.requires_grad_(True)


def convert(model: nn.Module, config: MEFTConfig | None = None, *, example_inputs=None) -> nn.Module:
    """Rewrite `model` so that its transformer layers run as MEFT reversible couplings.

    Args:
        model: any module torch.export (or torch.fx) can trace; transformers models need no inputs.
        config: a `MEFTConfig` (default: `MEFTConfig()`, MEFT3 reversible).
        example_inputs: keyword arguments (dict) or positional arguments (tuple) for one forward call;
            for transformers models None uses the model's dummy inputs. Batch size and sequence
            length are traced as dynamic, so the result accepts other sizes.

    Returns the converted model, called exactly like the original (same arguments, same output
    class, `.loss` when labels are given). Only adapters (and a task head, see
    `MEFTConfig.train_head`) require grad. Unless `config.inplace`, `model` itself is not changed.

    Raises:
        ConversionError: no transformer layer could be rewritten (with the reason per candidate),
            or the model could not be traced (`CaptureError`, with each tracer's error).
        ValueError / TypeError: bad config or inputs.
    """
    config = MEFTConfig() if config is None else config
    if not isinstance(config, MEFTConfig):
        raise TypeError(f"config must be a meft_fx.MEFTConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    verbose = config.verbose
    progress = Progress(verbose)
    target = model if config.inplace else copy.deepcopy(model)
    if is_transformers_model(target) and hasattr(target.config, "use_cache"):
        target.config.use_cache = False
    args, kwargs = normalize_inputs(target, example_inputs)
    was_training = target.training
    target.train()
    try:
        progress(f"capturing {type(target).__name__}")
        full, spec = capture(target, args, kwargs, config.capture)
        full = passes.hoist_shape_queries(full)
        full = passes.dropout_to_modules(full)
        progress("finding the residual stream")
        analysis = passes.group_layers(passes.find_residual_units(full))
        if not analysis.stacks:
            raise ConversionError(f"{type(model).__name__}: no transformer layer to rewrite (looked for residual "
                                  f"sub-blocks x + f(x), grouped as attention + FFN)", analysis.rejected)
        owners = []
        for st in analysis.stacks:
            owner = st.owner
            if owner not in owners:
                owners.append(owner)
        # A module that contains another owner is rewritten as a whole.
        owners = [o for o in owners if not any(o != p and (p == "" or o.startswith(p + ".")) for p in owners)]
        progress(f"found {sum(len(s.layers) for s in analysis.stacks)} layers in "
                 f"{', '.join(o or type(target).__name__ for o in owners)}")
        calls = _record_calls(target, [o for o in owners if o], args, kwargs) if any(owners) else {}
        results = []
        for owner in owners:
            module = target.get_submodule(owner) if owner else target
            if owner:
                if owner not in calls:
                    raise ConversionError(f"{owner} was found in the graph but was not called during the example forward")
                a, k = calls[owner]
                progress(f"capturing {owner} ({type(module).__name__})")
                gm, spec = capture(module, a, k, config.capture)
            else:
                gm, spec = capture(target, args, kwargs, config.capture)
            adapters: dict = {}
            gm, sub_analysis, programs = rewrite(gm, config, progress, adapters)
            if not sub_analysis.stacks:
                raise ConversionError(f"{owner or type(model).__name__}: the stack found in the whole model was not found "
                                      f"when tracing this module alone", sub_analysis.rejected)
            gm.meft_programs = programs
            results.append((owner, ConvertedModule(module, gm, spec, config, adapters, analysis.rejected, owner)))
        out = target
        for owner, conv in results:
            if owner:
                _set_submodule(target, owner, conv)
            else:
                out = conv
        _freeze(out, config)
        out.meft_config = config
    finally:
        target.train(was_training)
    out.train(was_training)
    n_train = sum(p.numel() for p in out.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in out.parameters())
    progress(f"done: {sum(isinstance(m, ReversibleStack) for m in out.modules())} reversible stack(s); "
             f"{n_train:,} of {n_all:,} parameters trainable ({100 * n_train / max(n_all, 1):.2f}%)")
    return out
