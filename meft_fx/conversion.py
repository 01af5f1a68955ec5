"""`convert`: validate → copy → capture → run the pipeline → install. The one entry point of meft_fx.

The whole model is captured once and analysed (the pipeline up to `group_layers`) to find which
source modules own a transformer stack; each owner is then captured alone, rewritten by the whole
pipeline and replaced by a `ConvertedModule`, so the outer model object (heads, loss, `generate`,
the HF Trainer) is unchanged.
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn

from . import chunked_loss, generation, starting_point
from .capture import CallSpec, capture, is_transformers_model, module_mode, normalize_inputs, serves
from .compilation import compile_like
from .config import MEFTConfig
from .errors import ConversionError
from .nn.adapter import Adapter
from .passes import run_pipeline
from .progress import Progress
from .runtime import stacks_in
from .runtime.sharded import gathered, is_unit
from .runtime.units import half_class_names, share_halves


def capture_and_rewrite(module: nn.Module, args, kwargs, config: MEFTConfig, adapters: dict, progress, what: str):
    """(rewritten GraphModule, CallSpec, config) of `module(*args, **kwargs)`; ConversionError if no stack.

    The config returned is the one the passes used: `config` with method "auto" resolved for this module.

    The module is traced in train mode (dropout stays in the graph); `gm.meft_programs` holds the
    pipeline's snapshots. `adapters` is the registry shared by every capture of the module.
    """
    with module_mode(module, True):
        gm, spec = capture(module, args, kwargs, config.capture)
    sizes = gm.meta.get("static_sizes", ())
    result = run_pipeline(gm, config, adapters, progress=progress)
    result.gm.meta["static_sizes"] = sizes
    result.gm.meta["method_reason"] = result.method_reason
    if not result.analysis.stacks:
        raise ConversionError(f"{what}: no transformer layer to rewrite when capturing {spec.describe()} (looked "
                              f"for residual sub-blocks x + f(x), grouped as attention + FFN)", result.analysis.rejected)
    result.gm.meft_programs = result.programs
    return result.gm, spec, result.config


class ConvertedModule(nn.Module):
    """Stands in for the module that held a transformer stack; called exactly like it.

    It runs the rewritten graph captured for the call's structure (which arguments are tensors or
    None, flags) and sizes (the dimensions the captured program holds fixed: a size-1 batch or
    sequence in the example, say). A call with a new structure or such a size (a padding mask where
    the first call had none, batch 4 after a batch-1 example) is captured and rewritten once more,
    reusing the same adapters and pretrained parameters, like torch.compile recompiling on a guard
    failure.
    """

    #: How far this module starts from the original (`meft_fx.starting_point.StartingPoint`; set by convert).
    starting_point = None
    stream_choice = None  # the exact streams' width convert chose (meft_fx.stream_width)
    method_reason = ""  # why convert used its method (MEFTConfig.method_reason; shown by explain)

    def __init__(self, original: nn.Module, gm: fx.GraphModule, spec, config: MEFTConfig, adapters: dict,
                 unmatched: list, owner: str, example: tuple | None = None):
        super().__init__()
        self.graph_module = gm
        self.original_class = type(original).__name__
        self.owner = owner
        self.meft_unmatched = list(unmatched)
        self.__dict__["_original"] = original
        self.__dict__["_variants"] = {spec.key: [gm]}
        self.__dict__["_config"] = config
        self.__dict__["_adapters"] = adapters
        self.__dict__["_example"] = example  # (args, kwargs) of the capture: the probe of a CachePlan
        self.__dict__["_cache_plan"] = None

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
        """How many call structures (and fixed sizes) have been captured."""
        return sum(len(gms) for gms in self._variants.values())

    @property
    def graph_modules(self) -> list:
        """The rewritten GraphModule of every captured call structure, the first (main) one first."""
        main = self.graph_module
        return [main] + [g for gms in self._variants.values() for g in gms if g is not main]

    @property
    def stacks(self) -> list:
        """Every `ReversibleStack` of every captured call structure, the main graph's first (what λ/β, the stream
        width and other runtime settings of a conversion are applied to)."""
        return [st for gm in self.graph_modules for st in stacks_in(gm)]

    @property
    def original(self) -> nn.Module:
        """The module this one replaced (its parameters are shared with the rewritten graphs)."""
        return self._original

    @property
    def config(self) -> MEFTConfig:
        """The MEFTConfig later call structures are captured with."""
        return self._config

    @config.setter
    def config(self, config: MEFTConfig) -> None:
        if not isinstance(config, MEFTConfig):
            raise TypeError(f"config must be a meft_fx.MEFTConfig, got {type(config).__name__}")
        self.__dict__["_config"] = config.validate()

    __deepcopy__ = chunked_loss.copy_instance
    NOT_DEEPCOPIED = ("_cache_plan",)

    @property
    def cache_plan(self):
        """How calls with a KV cache run (`meft_fx.generation.CachePlan`), made on first use;
        CacheUnsupported (with the reason) when they cannot."""
        if self._cache_plan is None:
            self._refuse_unplanned_cache()
            if self._example is None:
                raise generation.CacheUnsupported("converted without a recorded example call")
            with gathered(self.__dict__.get("_sharded_halves", ())):  # meft_fx.shard: copies read whole weights
                self.__dict__["_cache_plan"] = generation.CachePlan(self, self._example)
        return self._cache_plan

    def _refuse_unplanned_cache(self) -> None:
        """When convert found that no KV cache can be planned, a call asking for one gets why and what to do, not a
        second attempt (the generation loop would feed this module only the newest token, so running uncached
        would be wrong)."""
        reason = self.__dict__.get("cache_unsupported")
        if reason:
            raise generation.CacheUnsupported(
                f"{self.owner or self.original_class}: a call with use_cache=True (or a cache object), but this "
                f"converted model cannot use a KV cache: {reason}. convert() set generation_config.use_cache=False, "
                f"so generate() without use_cache=True runs uncached (same tokens, slower); explain(model) shows "
                f"the reason under 'generation:'")

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"a model converted by meft_fx cannot be pickled (torch.save(model)): its rewritten graphs hold "
            f"torch.export closures. Save what training changed with meft_fx.save_adapters(model, folder) (the "
            f"adapters and a trained head, a few hundred KB) and load them into a fresh conversion of the same base "
            f"model with meft_fx.load_adapters(meft_fx.convert(base, meft_fx.adapter_config(folder)), folder); or save "
            f"model.state_dict(). ({self.owner or self.original_class})")

    def forward(self, *args, **kwargs):
        if not self.__dict__.get("_sharded_halves"):
            _warn_sharded_elsewhere(self)
        if generation.wants_cache(kwargs):
            if not (self.training and torch.is_grad_enabled()):
                return self.cache_plan.call(args, kwargs)
            kwargs = generation.without_cache(kwargs, self.owner or self.original_class)
        tensors, key = CallSpec.flatten(args, kwargs)
        gm = self._captured_for(key, tensors)
        if gm is None and (same := _same_call_other_no_cache(self._original, kwargs)) is not None:
            gm = self._captured_for(CallSpec.flatten(args, same)[1], tensors)
        if gm is None:
            gm = self._recapture(args, kwargs, key)
        if gm is not self.graph_module and gm.training != self.training:
            gm.train(self.training)
        return gm(*tensors)

    def _captured_for(self, key, tensors):
        """The GraphModule captured for this call structure that serves these tensors' sizes, or None."""
        return next((g for g in self._variants.get(key, ()) if serves(g, tensors)), None)

    @torch._disable_dynamo  # under torch.compile: capture eagerly, behind a graph break
    def _recapture(self, args, kwargs, key):
        progress = Progress(self._config.verbose)
        what = self.owner or self.original_class
        progress(f"{what}: new call structure, capturing again")
        with gathered(self.__dict__.get("_sharded_halves", ())):  # meft_fx.shard: trace the whole weights
            gm, _, _ = capture_and_rewrite(self._original, args, kwargs, self._config, self._adapters, progress,
                                           f"{what} (called with a new argument structure)")
        trainable = {id(p) for p in self.graph_module.parameters() if p.requires_grad}
        for p in gm.parameters():
            p.requires_grad_(id(p) in trainable)
        compile_like(gm, self.graph_module)  # stacks of a meft_fx.compile'd model: the new ones too
        if self.__dict__.get("_sharded_halves"):  # meft_fx.shard: its halves run through the FSDP2 units
            share_halves(self.graph_module, gm)
        self._variants.setdefault(key, []).append(gm)
        return gm


def _warn_sharded_elsewhere(conv: ConvertedModule) -> None:
    """FSDP2 made the halves units without `meft_fx.shard` (Accelerate's or the Trainer's auto wrap): it works, but the
    original module and the other captured graphs still hold every frozen weight whole on each rank."""
    if "_first_half" not in conv.__dict__:
        conv.__dict__["_first_half"] = next((c.F for m in stacks_in(conv.graph_module) for c in m.couplings), None)
    first = conv.__dict__["_first_half"]
    if first is not None and is_unit(first) and not conv.__dict__.get("_warned_sharded"):
        conv.__dict__["_warned_sharded"] = True
        warnings.warn(SHARDED_ELSEWHERE, stacklevel=3)


SHARDED_ELSEWHERE = (
    "meft_fx: FSDP2 sharded the reversible halves of this model without meft_fx.shard (an auto-wrap policy of "
    "Accelerate or the Trainer?). Training is correct, but each rank still holds every frozen weight whole: the "
    "converted module keeps the original and its other captured graphs, which share those weights and which "
    "fully_shard does not see. Call meft_fx.shard(model) before accelerator.prepare / Trainer(...) instead "
    "(they leave a sharded model as it is); it shards the copies too.")


def _same_call_other_no_cache(original: nn.Module, kwargs: dict):
    """The same call with `use_cache=None` for `False` or the other way round, when the module's config says
    no cache (as `convert` leaves a transformers model) — one captured program serves both (the chunked
    loss's training forward passes False where the example call passed nothing); else None."""
    if "use_cache" not in kwargs or kwargs["use_cache"] not in (None, False):
        return None
    if getattr(getattr(original, "config", None), "use_cache", None) is not False:
        return None
    return {**kwargs, "use_cache": None if kwargs["use_cache"] is False else False}


def _record_calls(model: nn.Module, paths, args, kwargs) -> dict:
    """{path: (args, kwargs)} of the first call of each submodule at `paths` in one no-grad forward."""
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


def modules_to_save(model: nn.Module, names) -> list:
    """The parameters of the modules `names` (MEFTConfig.modules_to_save) of an unconverted `model`;
    a parameter one of them shares with a module outside them (a head tied to the input embeddings)
    is replaced by a copy first, so training it leaves the other module's tensor as it was."""
    paths = [p for p, _ in model.named_modules() if p]
    chosen = {}
    for name in names:
        hits = [p for p in paths if p == name] or [p for p in paths if p.endswith("." + name)]
        if len(hits) != 1:
            near = [p for p in paths if name.split(".")[-1] in p.split(".")][:8]
            raise ValueError(f"MEFTConfig.modules_to_save: {name!r} names {'no' if not hits else len(hits)} module"
                             f"{'s' if hits else ''} of {type(model).__name__}{': ' + ', '.join(hits[:8]) if hits else ''}"
                             f"; give a full path{' such as ' + ', '.join(near) if near else ''}")
        chosen[hits[0]] = model.get_submodule(hits[0])
    outside = {id(p) for path, m in model.named_modules() if path not in chosen and not any(
        path.startswith(c + ".") for c in chosen) for p in m.parameters(recurse=False)}
    for m in chosen.values():
        for sub in m.modules():
            for pname, p in list(sub.named_parameters(recurse=False)):
                if id(p) in outside:  # tied: this module trains its own copy
                    setattr(sub, pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                        model.config.tie_word_embeddings = False
    return [p for m in chosen.values() for p in m.parameters()]


def _freeze(model: nn.Module, config: MEFTConfig, trainable_before: set, saved: list) -> None:
    """Train the adapters, the modules to save and, with `train_head`, the head parameters that were
    trainable before."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in saved:
        p.requires_grad_(True)
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
            if id(p) not in frozen and id(p) in trainable_before:
                p.requires_grad_(True)


#: Owners found per architecture (`_architecture_key`), most recent last: converting the same
#: architecture again (another method, a fresh copy of the base model) skips the whole-model trace.
_OWNERS: OrderedDict = OrderedDict()
OWNERS_KEPT = 32


def _architecture_key(target: nn.Module, args, kwargs, config: MEFTConfig):
    """What the owners depend on: module tree (names, classes, plain attributes), parameter shapes and
    dtypes, the transformers config, the call's structure and the capture mode. None when the config
    cannot be read."""
    cfg = getattr(target, "config", None)
    try:
        cfg_key = (cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else None,
                   getattr(cfg, "_attn_implementation", None), getattr(cfg, "_experts_implementation", None))
    except Exception:  # noqa: BLE001 - an exotic config: no caching, trace as always
        return None
    modules = tuple((n, type(m).__module__, type(m).__qualname__, _plain_attributes(m)) for n, m in target.named_modules())
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in target.named_parameters())
    return modules, params, cfg_key, CallSpec.flatten(args, kwargs)[1], config.capture


def _plain_attributes(m: nn.Module) -> tuple:
    """A module's own flags and sizes (e.g. dropout p, a `causal` switch): they can change its forward."""
    return tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                        and (v is None or isinstance(v, (bool, int, float, str)))))


def _find_owners(target: nn.Module, args, kwargs, config: MEFTConfig, progress) -> tuple[list, list]:
    """(owner module paths, rejection reasons): the smallest modules that hold a stack ("" = the model)."""
    key = _architecture_key(target, args, kwargs, config)
    if key is not None and key in _OWNERS:
        _OWNERS.move_to_end(key)
        owners, rejected, line = _OWNERS[key]
        progress(line + " (this architecture was converted before: the whole-model trace is skipped)")
        return list(owners), list(rejected)
    owners, rejected, line = _trace_owners(target, args, kwargs, config, progress)
    if key is not None:
        _OWNERS[key] = (tuple(owners), tuple(rejected), line)
        while len(_OWNERS) > OWNERS_KEPT:
            _OWNERS.popitem(last=False)
    return owners, rejected


def _trace_owners(target: nn.Module, args, kwargs, config: MEFTConfig, progress) -> tuple[list, list, str]:
    """`_find_owners` by tracing the whole model; also the progress line that says what was found."""
    progress(f"capturing {type(target).__name__}")
    with module_mode(target, True):
        full, _ = capture(target, args, kwargs, config.capture)
    analysis = run_pipeline(full, until="group_layers", progress=progress).analysis
    if not analysis.stacks:
        raise ConversionError(f"{type(target).__name__}: no transformer layer to rewrite (looked for residual "
                              f"sub-blocks x + f(x), grouped as attention + FFN)", analysis.rejected)
    owners = list(dict.fromkeys(st.owner for st in analysis.stacks))
    # A module that contains another owner is rewritten as a whole.
    owners = [o for o in owners if not any(o != p and (p == "" or o.startswith(p + ".")) for p in owners)]
    line = (f"found {sum(len(s.layers) for s in analysis.stacks)} layers in "
            f"{', '.join(o or type(target).__name__ for o in owners)}")
    progress(line)
    return owners, analysis.rejected, line


def _convert_owners(target: nn.Module, args, kwargs, config: MEFTConfig, progress) -> nn.Module:
    """Replace every owner of a stack in `target` by its ConvertedModule; returns the converted model."""
    owners, rejected = _find_owners(target, args, kwargs, config, progress)
    calls = _record_calls(target, [o for o in owners if o], args, kwargs) if any(owners) else {}
    out = target
    for owner in owners:
        if owner and owner not in calls:
            raise ConversionError(f"{owner} was found in the graph but was not called during the example forward")
        module = target.get_submodule(owner) if owner else target
        a, k = calls[owner] if owner else (args, kwargs)
        progress(f"capturing {owner or type(module).__name__} ({type(module).__name__})")
        adapters: dict = {}
        gm, spec, used = capture_and_rewrite(module, a, k, config, adapters, progress, owner or type(module).__name__)
        conv = ConvertedModule(module, gm, spec, used, adapters, rejected, owner, example=(a, k))
        conv.method_reason = gm.meta["method_reason"]
        if used.method != config.method:
            progress(f"method {used.method}: {conv.method_reason}")
        if owner:
            _set_submodule(target, owner, conv)
        else:
            out = conv
    return out


def _chunk_head(model: nn.Module, config: MEFTConfig) -> None:
    """A vocabulary head outside the stack's owner: the model's training forward chunks it (`chunk_loss`).

    (A head inside the owner's program is chunked by the pipeline's `chunk_head_loss` pass.)"""
    if hasattr(model, "gradient_checkpointing_enable"):  # transformers models: it warns instead of doing nothing
        model.__class__ = chunked_loss.model_class(type(model))
    owners = [m.owner for m in model.modules() if isinstance(m, ConvertedModule)]
    if config.chunk_loss and len(owners) == 1 and owners[0] and chunked_loss.has_vocabulary_head(model, owners[0]):
        chunked_loss.install(model, owners[0], config.loss_chunk_bytes, config.verbose)


def _plan_caches(model: nn.Module, progress) -> bool:
    """Make every ConvertedModule's CachePlan; True when all can (then generate() uses a KV cache).

    When one cannot, its `cache_unsupported` says why (shown by `explain`) and generate() runs uncached."""
    ok = True
    for m in model.modules():
        if isinstance(m, ConvertedModule):
            try:
                m.cache_plan
            except generation.CacheUnsupported as e:
                m.cache_unsupported, ok = str(e), False
                progress(f"{m.owner or m.original_class}: generate() runs without a KV cache: {e}")
    if ok:
        progress("generate(): with a KV cache")
    return ok


def _check_model(model) -> None:
    """TypeError / ConversionError for what convert cannot take: not a module, converted, a PEFT model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    stacks = len(stacks_in(model))
    if stacks or hasattr(model, "meft_config"):
        raise ConversionError(f"{type(model).__name__} is already converted by meft_fx ({stacks} reversible stack(s)); "
                              f"convert the original model, or load saved adapters into a fresh conversion with "
                              f"meft_fx.load_adapters")
    peft = next((type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")), None)
    if peft is not None:
        raise ConversionError(f"{type(model).__name__} holds PEFT modules ({peft}): meft_fx adds its own adapters and "
                              f"would freeze PEFT's. Convert the base model instead (model.get_base_model(), or "
                              f"merge_and_unload() to keep trained LoRA weights in the base)")


#: Per-layer outputs a reversible stack cannot return (its layers' states are never stored).
PER_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions")


def refuse_per_layer_outputs(model: nn.Module, args, kwargs):
    """Forward pre-hook of a converted model: a clear error for per-layer outputs, never an empty tuple."""
    cfg = getattr(model, "config", None)
    for name in PER_LAYER_OUTPUTS:
        asked = kwargs.get(name)
        if asked or (asked is None and getattr(cfg, name, False) is True):
            raise ValueError(f"{name}=True: a model converted by meft_fx cannot return per-layer "
                             f"{name.split('_', 1)[1].replace('_', ' ')} (its reversible stack keeps no layer's "
                             f"state; the layers' outputs would come back empty). Call it with {name}=False (and "
                             f"set model.config.{name} = False), or use the unconverted model for them")
    return None


def convert(model: nn.Module, config: MEFTConfig | None = None, *, example_inputs=None) -> nn.Module:
    """Rewrite `model` so that its transformer layers run as MEFT reversible couplings.

    Args:
        model: any module torch.export (or torch.fx) can trace; transformers models need no inputs.
        config: a `MEFTConfig` (default: `MEFTConfig()`, MEFT3 reversible, exact numerics).
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
    config.validate()
    _check_model(model)
    progress = Progress(config.verbose)
    target = model if config.inplace else copy.deepcopy(model)
    probe = _probe(target, example_inputs)  # before the rewrite: the original model may sample it
    gen_cfg = getattr(target, "generation_config", None) if is_transformers_model(target) else None
    generate_cached = getattr(gen_cfg, "use_cache", False)
    if is_transformers_model(target):  # captures and training calls run without a KV cache
        for cfg in (target.config, gen_cfg):
            if hasattr(cfg, "use_cache"):
                cfg.use_cache = False
    args, kwargs = normalize_inputs(target, example_inputs)
    was_training = target.training
    trainable_before = {id(p) for p in target.parameters() if p.requires_grad}
    saved = modules_to_save(target, config.modules_to_save)
    out = _convert_owners(target, args, kwargs, config, progress)
    _chunk_head(out, config)
    convs = [m for m in out.modules() if isinstance(m, ConvertedModule)]
    starting_point.choose_scale(out, convs, config, *(probe if probe else ((args, kwargs), "the model's dummy inputs")),
                                progress)
    if generate_cached and callable(getattr(out, "can_generate", None)) and out.can_generate():
        gen_cfg.use_cache = _plan_caches(out, progress)
    _freeze(out, config, trainable_before, saved)
    used = {m.config.method: m.config for m in out.modules() if isinstance(m, ConvertedModule)}
    out.meft_config = next(iter(used.values())) if len(used) == 1 else config
    out.register_forward_pre_hook(refuse_per_layer_outputs, with_kwargs=True)
    _name_units(out)
    out.train(was_training)
    n_train, n_all = trainable_parameters(out)
    head = getattr(out, "get_output_embeddings", lambda: None)()
    frozen_head = isinstance(head, nn.Module) and not any(p.requires_grad for p in head.parameters())
    progress(f"done: {len(stacks_in(out))} reversible stack(s); "
             f"{n_train:,} of {n_all:,} parameters trainable ({100 * n_train / max(n_all, 1):.2f}%)"
             + ("; the LM head stays frozen (MEFTConfig(modules_to_save=('lm_head',)) trains it)" if frozen_head else ""))
    return out


def _name_units(model: nn.Module) -> None:
    """A transformers model's `_no_split_modules` gains its halves' classes (Accelerate's and the Trainer's FSDP2
    TRANSFORMER_BASED_WRAP policy then shards each half on its own, as `meft_fx.shard` does)."""
    if is_transformers_model(model):
        model._no_split_modules = set(getattr(model, "_no_split_modules", None) or ()) | set(half_class_names(model))


def _probe(model: nn.Module, example_inputs):
    """((args, kwargs), description) the starting point is measured on (`meft_fx.starting_point`): the caller's
    example inputs, else text a causal LM samples itself; None: the model's dummy inputs."""
    if example_inputs is not None:
        return normalize_inputs(model, example_inputs), "the example inputs"
    sampled = starting_point.sample_probe(model) if is_transformers_model(model) else None
    if sampled is None:
        return None
    n, t = sampled["input_ids"].shape
    return ((), sampled), f"{n} × {t} tokens the original model sampled"


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `model`, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) "trainable params: N || all params: M || trainable%: P", as PEFT does."""
    n_train, n_all = trainable_parameters(model)
    line = f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%: {100 * n_train / max(n_all, 1):.4f}"
    print(line)
    return line


def from_pretrained(base_model: nn.Module, folder, **overrides) -> nn.Module:
    """Convert `base_model` with the MEFTConfig saved in `folder` and load the adapters: one step, as
    PEFT's `PeftModel.from_pretrained(base, folder)`. The result predicts exactly like the model that
    was saved. `overrides`: MEFTConfig fields that do not change the network (verbose, inplace,
    chunk_loss, reversible, ...); a field of the network (method, adapter_rank, numerics, ...) is a
    ValueError. Raises what `adapter_config`, `convert` and `load_adapters` raise."""
    from .checkpoint import NETWORK_FIELDS, adapter_config, load_adapters

    config = adapter_config(folder)
    network = sorted(set(overrides) & set(NETWORK_FIELDS + ("lam", "beta")))
    if network:
        raise ValueError(f"from_pretrained: {', '.join(network)} would change the network the adapters in {folder} "
                         f"were trained for; leave them out (they come from the folder)")
    if overrides:
        config = MEFTConfig(**{**config.to_dict(), **overrides})
    return load_adapters(convert(base_model, config), folder)
