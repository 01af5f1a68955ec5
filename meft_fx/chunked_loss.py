"""`chunk_loss(model)`: train a model whose vocabulary head + cross-entropy never builds the full logits.

The head and loss usually sit outside the module that holds the transformer stack (an HF causal
LM: `lm_head` and `loss_function` in `LlamaForCausalLM.forward`, the stack in `.model`). So the
model's class gets a forward that, in a training call under grad, runs the model's own forward up
to the *body* (the module whose output feeds the head: the converted stack's owner after
`convert`), then the *tail*: the rest of the forward, captured once per call structure with the
body's output as its input and rewritten by the `chunk_head_loss` pass. Calls whose tail has no
head to chunk (no labels, a small classifier) run the original forward from then on; eval and
no_grad calls always do. Under torch.compile a training call runs behind a graph break: the body
compiled, the chunked tail eager. `convert` installs this by default
(`MEFTConfig.chunk_loss`); this function does it for a model that is not made reversible.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import warnings
import weakref

import torch
from torch import nn

from .capture import capture, normalize_inputs, serves
from .capture.call_spec import CallSpec
from .nn.head_loss import DEFAULT_CHUNK_BYTES, MODES
from .passes.fx.provenance import module_paths
from .passes.transforms.chunk_head_loss import MIN_CLASSES, chunk_head_loss, find_head_losses
from .progress import Progress

STATE = "_meft_chunked_loss"


class _BodyDone(Exception):
    """Raised by the body's forward hook: the original forward stops there; the tail takes over."""


class _Replay(nn.Module):
    """Stands in for the body while the tail is captured: returns the body's output given to the tail."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.value


class _Tail(nn.Module):
    """`forward(body_output, *args, **kwargs)`: the model's forward with the body's output given."""

    def __init__(self, model: nn.Module, forward, body: str):
        super().__init__()
        self.model = model
        self.__dict__["fn"] = forward
        self.body = body

    def forward(self, body_output, *args, **kwargs):
        replay = _Replay(body_output)
        parent, _, child = self.body.rpartition(".")
        holder = self.model.get_submodule(parent) if parent else self.model
        original = getattr(holder, child)
        setattr(holder, child, replay)
        try:
            out = self.fn(self.model, *args, **kwargs)
        finally:
            setattr(holder, child, original)
        if replay.calls != 1:
            raise RuntimeError(f"{self.body} is called {replay.calls} times by the forward")
        return out


class ChunkedLoss:
    """The state `chunk_loss` keeps on a model: the body's path, the chunk size, the captured tails."""

    def __init__(self, body: str, chunk_bytes: int, params=(), verbose: bool = False, mode: str = "vocab"):
        self.body = body
        self.mode = mode
        self.params = frozenset(params)
        self.chunk_bytes = chunk_bytes
        self.verbose = verbose
        self.tails: dict = {}  # tail call key -> [GraphModule, ...]
        self.plain: set = set()  # keys of calls with nothing to chunk: the original forward runs them

    def run(self, model: nn.Module, forward, args, kwargs):
        """The model's output for a training call: its forward to the body, then the chunked tail."""
        call_key = CallSpec.flatten(args, kwargs)[1]
        if call_key in self.plain:
            return forward(model, *args, **kwargs)
        caught = {}

        def stop(mod, a, out):
            caught["out"] = out
            raise _BodyDone

        hook = model.get_submodule(self.body).register_forward_hook(stop)
        try:
            result = forward(model, *args, **kwargs)
        except _BodyDone:
            result = None
        finally:
            hook.remove()
        if "out" not in caught:  # the body was not called: nothing to take over
            self.plain.add(call_key)
            return result
        tensors, key = CallSpec.flatten((caught["out"], *args), kwargs)
        gm = next((g for g in self.tails.get(key, ()) if serves(g, tensors)), None)
        if gm is None:
            gm, chunked = self._capture(model, forward, caught["out"], args, kwargs, key)
            if gm is None:  # not capturable: run the whole forward once more (rare)
                self.plain.add(call_key)
                return forward(model, *args, **kwargs)
            if not chunked:  # the tail is the forward's remainder: it finishes this call
                self.plain.add(call_key)
        return gm(*tensors)

    @torch._disable_dynamo
    def _capture(self, model, forward, body_out, args, kwargs, key):
        """(tail program, whether it is chunked) for this call structure; (None, False) if it cannot be captured."""
        Progress(self.verbose)(f"capturing the head and loss after {self.body} for a new call structure")
        try:
            gm, _ = capture(_Tail(model, forward, self.body), (body_out, *args), kwargs, "export")
        except Exception as e:  # noqa: BLE001 - the unchunked forward still works
            warnings.warn(f"meft_fx chunk_loss: the head and loss after {self.body} could not be captured for this "
                          f"call structure ({type(e).__name__}); it runs unchunked: {str(e).splitlines()[0][:300]}")
            return None, False
        gm.graph.eliminate_dead_code()
        gm.recompile()
        if not any(not m.reason for m in find_head_losses(gm)):
            return gm, False
        gm = chunk_head_loss(gm, self.chunk_bytes, self.mode)
        self.tails.setdefault(key, []).append(gm)
        return gm, True


def model_class(cls: type) -> type:
    """A subclass of `cls` (same name) whose training forward goes through the model's ChunkedLoss and
    whose `gradient_checkpointing_enable` says that a converted model needs none."""
    if getattr(cls, "_meft_chunked_base", None) is not None:
        return cls
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        state = self.__dict__.get(STATE)
        if state is None or not (self.training and torch.is_grad_enabled()) or torch.compiler.is_exporting():
            return original(self, *args, **kwargs)
        if "use_cache" in state.params and kwargs.get("use_cache") is None:
            kwargs = {**kwargs, "use_cache": False}  # a training step needs no KV cache
        if torch.compiler.is_compiling():
            return _run_behind_graph_break(state, self, original, args, kwargs)
        return state.run(self, original, args, kwargs)

    attrs = {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
             "_meft_chunked_base": cls, "__reduce_ex__": _refuse_pickle,
             "__deepcopy__": copy_instance}
    for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable"):  # transformers 4 / 5 names
        if hasattr(cls, name):
            attrs[name] = _checkpointing_enable(getattr(cls, name))
    if hasattr(cls, "save_pretrained"):
        attrs["save_pretrained"] = _save_pretrained(cls.save_pretrained)
        attrs["_keys_to_ignore_on_save"] = _frozen_keys(getattr(cls, "_keys_to_ignore_on_save", None))
    return type(cls.__name__, (cls,), attrs)


#: body module -> its compiled forward (for training calls under torch.compile); not on the model, so
#: copies and saved state are unaffected.
_COMPILED_BODIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _body_compile_settings(body: nn.Module) -> dict:
    """The settings the body's stacks were compiled with (`meft_fx.compile`), else the stacks' defaults."""
    from .runtime.stack import default_compile_settings, stacks_in

    return next((m.compile_settings for m in stacks_in(body) if m.compile_settings is not None),
                default_compile_settings())


def _run_behind_graph_break(state: ChunkedLoss, model, forward, args, kwargs):
    """A training call under torch.compile: the forward runs eagerly up to the body, which runs compiled
    (its forward compiled once, with its stacks' settings), then the chunked tail eagerly — so the
    logits are never built under compile either (traced, the forward would run the unchunked head)."""
    body = model.get_submodule(state.body)
    compiled = _COMPILED_BODIES.get(body)
    if compiled is None:
        compiled = _COMPILED_BODIES[body] = torch.compile(body.forward, **_body_compile_settings(body))
    body.forward = compiled  # for this call only: the module's own forward again afterwards
    try:
        return state.run(model, forward, args, kwargs)
    finally:
        del body.forward


_run_behind_graph_break = torch.compiler.disable(
    _run_behind_graph_break, reason="meft_fx chunked head and loss (the body before it runs compiled)")


def copy_instance(self, memo):
    """`__deepcopy__` of meft_fx's module classes: copy.deepcopy works where pickling does not (the
    instance's state, copied, the class kept; attributes the class names in `NOT_DEEPCOPIED`, caches of
    what can be made again, start empty)."""
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    skip = getattr(type(self), "NOT_DEEPCOPIED", ())
    for k, v in self.__dict__.items():
        new.__dict__[k] = None if k in skip else copy.deepcopy(v, memo)
    return new


def _refuse_pickle(self, protocol):
    raise TypeError(
        f"{type(self).__name__} rewritten by meft_fx cannot be pickled (torch.save(model)): its rewritten or "
        f"captured programs hold torch.export closures. Save what training changed with "
        f"meft_fx.save_adapters(model, folder) (or model.save_pretrained(folder)) and load it with "
        f"meft_fx.from_pretrained(base_model, folder); or save model.state_dict()")


def _save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """A converted model saves its adapters only (`meft_fx.checkpoint.save_pretrained`): what
        `trainer.save_model()` and Trainer checkpoints write; a model that is not converted saves as usual."""
        if getattr(self, "meft_config", None) is None:
            return original(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            from .checkpoint import save_pretrained as save_folder
            save_folder(self, save_directory)
        return None

    return save_pretrained


def _frozen_keys(default):
    """`_keys_to_ignore_on_save` of a converted model: every state-dict key that is not trained, so that
    the Trainer, resuming from an adapter-only checkpoint, expects exactly those to be missing."""
    def keys(self):
        if getattr(self, "meft_config", None) is None:
            return default
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        return [k for k in self.state_dict(keep_vars=True) if k not in trained]

    return property(keys)


def _checkpointing_enable(original):
    @functools.wraps(original)
    def gradient_checkpointing_enable(self, *args, **kwargs):
        if getattr(self, "meft_config", None) is None:  # chunk_loss on a model that is not converted
            return original(self, *args, **kwargs)
        warnings.warn(f"{original.__name__}() on a model converted by meft_fx does nothing: its reversible "
                      "stack keeps no layer's activations, so there is nothing to checkpoint (the Trainer's "
                      "gradient_checkpointing=True can be left off)", stacklevel=2)
        return None

    return gradient_checkpointing_enable


@contextlib.contextmanager
def unchunked(model: nn.Module):
    """Within this block, training calls of `model` run its own head and loss (full logits, e.g. to read
    `outputs.logits` in training); a model without the chunked forward is unaffected."""
    state = model.__dict__.pop(STATE, None)
    try:
        yield model
    finally:
        if state is not None:
            model.__dict__[STATE] = state


def has_vocabulary_head(model: nn.Module, body: str) -> bool:
    """Whether `model` has a linear map with ≥ MIN_CLASSES outputs outside `body` (a head worth chunking)."""
    inside = {id(m) for m in model.get_submodule(body).modules()}
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside]
    return any(m.out_features >= MIN_CLASSES for m in heads)


def install(model: nn.Module, body: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, verbose: bool = False,
            mode: str = "vocab") -> nn.Module:
    """Give `model` the chunked training forward with `body` (a submodule path) feeding its head."""
    model.get_submodule(body)  # AttributeError naming the path if there is none
    model.__class__ = model_class(type(model))
    params = inspect.signature(type(model)._meft_chunked_base.forward).parameters
    model.__dict__[STATE] = ChunkedLoss(body, chunk_bytes, params, verbose, mode)
    return model


def _body_of(model: nn.Module, args, kwargs) -> str:
    """The outermost submodule whose output feeds the model's chunkable head (from one capture)."""
    gm, _ = capture(model, args, kwargs, "export")
    found = [m for m in find_head_losses(gm) if not m.reason]
    if not found:
        reasons = "; ".join(m.reason for m in find_head_losses(gm)) or "no cross-entropy in the captured forward"
        raise ValueError(f"chunk_loss: {type(model).__name__} has no vocabulary head + cross-entropy to chunk "
                         f"({reasons}); pass example_inputs with labels")
    x = found[0].linear.args[0]
    while x.op == "call_function" and not module_paths(x) and x.args:
        x = x.args[0]
    paths = module_paths(x)
    if not paths:
        raise ValueError(f"chunk_loss: the head's input in {type(model).__name__} is not made by a submodule")
    return paths[0]


def chunk_loss(model: nn.Module, *, example_inputs=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               mode: str = "vocab", verbose: bool = False) -> nn.Module:
    """Make `model` (in place) compute its vocabulary head's cross-entropy in chunks in training.

    For a model that is not converted (a LoRA baseline, say); `meft_fx.convert` does this itself
    (`MEFTConfig.chunk_loss`). Same loss and gradients as the model's own; in training calls with
    labels `outputs.logits` is None. Args: example_inputs — one call *with labels* (for
    transformers models None uses the dummy inputs with labels = input_ids); chunk_bytes — logits
    bytes per chunk. Raises ValueError when the model has no head + cross-entropy to chunk.
    """
    if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes!r} must be a positive integer (bytes of logits per chunk)")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(map(repr, MODES))}")
    args, kwargs = normalize_inputs(model, example_inputs)
    if example_inputs is None and "labels" not in kwargs and "input_ids" in kwargs:
        kwargs = {**kwargs, "labels": kwargs["input_ids"]}
    if "use_cache" in inspect.signature(model.forward).parameters and kwargs.get("use_cache") is None:
        kwargs = {**kwargs, "use_cache": False}
    with torch.no_grad():
        body = _body_of(model, args, kwargs)
    return install(model, body, chunk_bytes, verbose, mode)
