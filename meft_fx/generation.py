"""Generation with a KV cache on converted decoders: `generate()`, `use_cache=True`, pipelines.

A converted decoder generates like the original: its `ConvertedModule` sees a call with a cache
(`cache=` / `past_key_values=` / `use_cache=True`) and runs `CachePlan.call` instead of the
captured graph. There, everything around the layers — embeddings, positions, rotary tables, the
causal mask over cache + new tokens, the final norm — is the original module's own forward, run
with its layers replaced by stand-ins. The stand-ins collect each layer's arguments; the last one
runs the whole reversible stack on the new tokens only: each coupling's forward program (the same
stream arithmetic as training), with a copy of each attention block whose SDPA appends the new
keys/values to the model's cache and attends over all of them (`passes.transforms.cache_attention`).

The stack's context (masks, rotary tables, sizes) is computed by nodes of the captured graph from
values made outside the layers. `CachePlan` reads that cone off the graph once and finds each
outside value among the layers' arguments by value, in one probe call of the example; sizes come
from the new tokens' shape. While the original runs for the plan (the probe, every cached call),
transformers' skip of an all-causal mask is off (`explicit_masks`): without padding it would pass
the layers None (SDPA's is_causal), where the captured graph always builds the mask, so the stack
would find no mask to read. The plan is checked end to end when it is made: a cached call of the
example must give the captured graph's output (else `CacheUnsupported`, and `convert` turns the
cache off with the reason in `explain`).

Why not capture the model with a cache: the cache update is a side effect on a Python object,
which torch.export turns into extra graph outputs that every pass would have to carry; reading
the masks and positions from the model's own code keeps them right for every cache class
(dynamic, sliding window) transformers has.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .capture import CallSpec, module_mode
from .nn.cached_attention import using_cache
from .passes.fx.dataflow import size_expr
from .passes.fx.ops import attention_nodes
from .passes.fx.provenance import module_paths
from .passes.transforms.cache_attention import cache_attention
from .runtime import ReversibleStack
from .runtime import fixed_point as fxp
from .runtime.codegen import coupling_program, inference_program
from .runtime.sharded import gathering

__all__ = ["CachePlan", "CacheUnsupported", "wants_cache", "CACHE_ARGUMENTS"]

#: Keyword arguments by which transformers models pass a KV cache.
CACHE_ARGUMENTS = ("cache", "past_key_values")
#: Largest relative difference allowed between a cached call of the example and the captured graph.
TOLERANCE = 1e-4
#: An exact stack's output during generation must stay below this (its unchecked fixed point maps NaN,
#: inf and int64 overflow to -2^(63 - frac_bits), far beyond any activation).
GENERATION_LIMIT = 2.0 ** 24


class CacheUnsupported(Exception):
    """This converted module cannot generate with a KV cache (the message says why)."""


def wants_cache(kwargs: dict) -> bool:
    """Does a call ask for a KV cache (a cache object, or use_cache=True)?"""
    return kwargs.get("use_cache") is True or any(kwargs.get(n) is not None for n in CACHE_ARGUMENTS)


def without_cache(kwargs: dict, what: str) -> dict:
    """A training call that asks for a cache runs without one (warned once), as transformers does under
    gradient checkpointing; a cache that already holds tokens is a ValueError."""
    cache = next((kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), None)
    if cache is not None and _is_cache(cache) and cache.get_seq_length() > 0:
        raise ValueError(f"{what}: a call with a KV cache that holds tokens in training mode with grad enabled; "
                         f"the reversible stack trains on whole sequences. Call model.eval() (or torch.no_grad()) "
                         f"to generate, or pass use_cache=False to train")
    warnings.warn(f"{what}: use_cache=True in training is ignored (the reversible stack keeps no keys/values); "
                  f"set model.config.use_cache = False", stacklevel=3)
    return {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS and k != "use_cache"}


def _is_cache(x) -> bool:
    return hasattr(x, "update") and hasattr(x, "get_seq_length") and not isinstance(x, (dict, nn.Module))


def _get(tree, path):
    return functools.reduce(lambda obj, key: key.get(obj), path, tree)


def _first_tensor(out):
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


class _StandIn(nn.Module):
    """Takes a layer's place during a cached call: records its arguments; the last one runs the stack."""

    def __init__(self, plan: "CachePlan", pos: int, layer: nn.Module):
        super().__init__()
        self.pos = pos
        self.__dict__["_plan"], self.__dict__["_layer"] = plan, layer

    def __getattr__(self, name: str):  # attributes of the layer (attention_type, ...) stay reachable
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args, **kwargs):
        return self._plan.layer_called(self.pos, args, kwargs)


class CachePlan:
    """How a converted module runs a call with a KV cache (see the module docstring).

    Raises CacheUnsupported when made for a module whose stack cannot run that way."""

    def __init__(self, conv: nn.Module, example: tuple):
        self.conv, self.original = conv, conv.original
        gm = conv.graph_module
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                     ReversibleStack)]
        if len(nodes) != 1:
            raise CacheUnsupported(f"{len(nodes)} reversible stacks in one module (one is supported)")
        self.node, self.stack = nodes[0], gm.get_submodule(nodes[0].target)
        self.container, self.names = self._layers()
        self.paths = [f"{self.container}.{n}" if self.container else n for n in self.names]
        calls, env = self._probe(example)
        self._read_context(gm, calls, env)
        self.programs: dict = {}
        self._blocks = [self._cached_blocks(c) for c in self.stack.couplings]
        self._check(gm, example)

    # ------------------------------------------------------------------------- making the plan
    def _layers(self):
        """(container path, child names): the layers the stack replaced, all of one ModuleList, in order."""
        layers = list(dict.fromkeys(c.record.layer for c in self.stack.couplings))
        parents = {p.rpartition(".")[0] for p in layers}
        if "" in layers:
            raise CacheUnsupported("the converted module is a single layer (a one-layer model: the layer itself "
                                   "owns the stack)")
        if len(parents) != 1:
            raise CacheUnsupported(f"the stack's layers {layers} are not the children of one module")
        parent = parents.pop()
        container = self.original.get_submodule(parent) if parent else self.original
        names = [p.rpartition(".")[2] for p in layers]
        if not isinstance(container, nn.ModuleList) or list(container._modules) != names:
            raise CacheUnsupported(f"{parent or 'the module'}: the stack covers {names}, not all of its layers")
        return parent, names

    def _probe(self, example):
        """(each layer's (args, kwargs) in the original's forward, every node's value in the graph) of the example."""
        args, kwargs = example
        calls: list = [None] * len(self.paths)
        hooks = [self.original.get_submodule(p).register_forward_pre_hook(
            lambda m, a, k, i=i: calls.__setitem__(i, (a, k)), with_kwargs=True) for i, p in enumerate(self.paths)]
        interp = fx.Interpreter(self.conv.graph_module, garbage_collect_values=False)
        try:
            with module_mode(self.original, False), module_mode(self.conv.graph_module, False), torch.no_grad(), \
                    torch.random.fork_rng(), explicit_masks():
                self.original(*args, **kwargs)
                interp.run(*CallSpec.flatten(args, kwargs)[0])
        finally:
            for h in hooks:
                h.remove()
        if any(c is None for c in calls):
            raise CacheUnsupported("the example forward did not call every layer")
        return calls, interp.env

    def _read_context(self, gm, calls, env) -> None:
        """The context's cone inside the layers, as a program of the values made outside them."""
        x, *context = self.node.args
        inside = functools.partial(_inside, layers=self.paths)
        members, boundary = _cone(context, inside)
        self.x_source = self._find(x, env[x], calls)
        self.sizes = _symbols(x)
        self.sources = [self._source(b, env, calls) for b in boundary]
        g, new = fx.Graph(), {}
        for b in boundary:
            new[b] = g.placeholder(b.name)
        for n in gm.graph.nodes:
            if n in members:
                new[n] = g.node_copy(n, lambda a: new[a])
        g.output(tuple(new[c] for c in context))
        self.context_program = fx.GraphModule(gm, g, class_name="CachedContext")

    def _source(self, node, env, calls):
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            expr = size_expr(val)
            free = expr.free_symbols - set(self.sizes)
            if free:
                raise CacheUnsupported(f"{node.format_node()}: a size not read off the layers' input")
            return ("size", expr)
        if not isinstance(env.get(node), torch.Tensor):
            raise CacheUnsupported(f"{node.format_node()}: the layers' context is not a tensor or a size")
        return self._find(node, env[node], calls)

    @staticmethod
    def _find(node, value, calls):
        """("arg", layer position, path) of the layer argument equal to `value`."""
        for pos, call in enumerate(calls):
            for path, leaf in pytree.tree_flatten_with_path(call)[0]:
                if (isinstance(leaf, torch.Tensor) and leaf.shape == value.shape and leaf.dtype == value.dtype
                        and torch.equal(leaf, value)):
                    return ("arg", pos, path, value)
        raise CacheUnsupported(f"{node.format_node()}: computed outside the layers and not one of their arguments")

    def _cached_blocks(self, coupling):
        """(F, G) of `coupling` with their attention reading the cache (the others unchanged)."""
        layer = self.paths.index(coupling.record.layer)
        out = []
        for block in (coupling.F, coupling.G):
            has = isinstance(block, fx.GraphModule) and bool(attention_nodes(block))
            try:
                out.append(cache_attention(block, layer) if has else block)
            except ValueError as e:
                raise CacheUnsupported(str(e)) from None
        return tuple(out)

    def _check(self, gm, example) -> None:
        """A cached call of the example must give what the captured graph gives."""
        args, kwargs = example
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}
        with module_mode(self.conv, False), module_mode(self.original, False), torch.no_grad(), torch.random.fork_rng():
            ref = _first_tensor(gm(*CallSpec.flatten(*example)[0]))
            try:
                got = _first_tensor(self.call(args, {**kwargs, "use_cache": True}))
            except Exception as e:  # noqa: BLE001 - any failure means: no cached generation
                raise CacheUnsupported(f"a cached call of the example failed: {type(e).__name__}: {e}") from None
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if got.shape != ref.shape or not err <= TOLERANCE:
            raise CacheUnsupported(f"a cached call of the example differs from the captured graph (relative {err:.2e})")
        self.check_error = err

    # ------------------------------------------------------------------------- running a call
    def call(self, args, kwargs):
        """The original module's forward on `args, kwargs`, its layers replaced by the stack over the cache."""
        if self.original.training != self.conv.training:  # the original is not a submodule: follow the mode
            self.original.train(self.conv.training)
        container = self.original.get_submodule(self.container) if self.container else self.original
        saved = dict(container._modules)
        self._calls = [None] * len(self.names)
        for pos, name in enumerate(self.names):
            container._modules[name] = _StandIn(self, pos, saved[name])
        try:
            with explicit_masks():
                return self.original(*args, **kwargs)
        finally:
            container._modules.clear()
            container._modules.update(saved)
            self._calls = None

    def layer_called(self, pos: int, args, kwargs):
        """A stand-in's forward: the last layer runs the stack; the others pass their input on."""
        self._calls[pos] = (args, kwargs)
        if pos < len(self.names) - 1:
            return args[0] if args else kwargs["hidden_states"]
        cache = next((v for v in (*args, *kwargs.values()) if _is_cache(v)), None)
        if cache is None:
            raise RuntimeError(f"{self.conv.owner or 'the model'} called its layers without a KV cache")
        return self.run_stack(self._calls, cache)

    def run_stack(self, calls, cache):
        """The stack on the new tokens, its context made from the layers' arguments, its attention on `cache`."""
        _, pos, path, _ = self.x_source
        x = _get(calls[pos], path)
        sizes = {sym: x.shape[d] for sym, d in self.sizes.items()}
        values = [self._value(src, calls, sizes) for src in self.sources]
        context = self.context_program(*values)
        with using_cache(cache):
            programs = [gathering(p, (c.F, c.G)) for p, c in zip(self._programs(x.dtype), self.stack.couplings)]
            out = self.stack.run_programs(x, context, programs=programs)
        if self.stack.arithmetic.powers_of_two and not bool(out.abs().amax() < GENERATION_LIMIT):
            raise fxp.FixedPointOverflow(f"{self.conv.owner or 'the model'}: the stack's output during generation is "
                                         f"NaN, infinite or beyond ±{GENERATION_LIMIT:g} (a diverged F or G)")
        return out

    @staticmethod
    def _value(src, calls, sizes):
        if src[0] == "size":
            return int(src[1].xreplace(sizes))
        return _get(calls[src[1]], src[2])

    def _programs(self, dtype):
        """Every coupling's forward program with the cached attention blocks, for F/G dtype `dtype`."""
        arith, n_ctx = self.stack.arithmetic, self.stack.num_context
        key = (dtype, arith.key, tuple((c.lam, c.beta, c.swap, c.compensate_f, c.compensate_g)
                                       for c in self.stack.couplings))
        progs = self.programs.get(key)  # made again when the stack's numerics or scales change
        if progs is None:
            progs = self.programs[key] = [
                inference_program(coupling_program(types.SimpleNamespace(
                    F=F, G=G, chunks={}, lam=c.lam, beta=c.beta, swap=c.swap, f_context=c.f_context,
                    g_context=c.g_context, compensate_f=c.compensate_f, compensate_g=c.compensate_g),
                    "forward", arith, n_ctx, dtype), checked=False)
                for c, (F, G) in zip(self.stack.couplings, self._blocks)]
        return progs


_EXPLICIT = threading.local()  # .depth: how many explicit_masks() this thread is inside


@contextlib.contextmanager
def explicit_masks():
    """While inside, transformers builds every causal mask as a tensor, padding or not (it otherwise passes the
    layers None when nothing is masked and SDPA's is_causal can stand for the mask): in this thread only, also
    when nested. A no-op for models that do not use transformers' masking utilities."""
    utils = sys.modules.get("transformers.masking_utils")
    skip = getattr(utils, "_ignore_causal_mask_sdpa", None)
    if skip is None:
        yield
        return
    if not getattr(skip, "meft_fx_explicit", False):  # installed once; it asks the thread's flag each call
        utils._ignore_causal_mask_sdpa = _unless_explicit(skip)
    _EXPLICIT.depth = getattr(_EXPLICIT, "depth", 0) + 1
    try:
        yield
    finally:
        _EXPLICIT.depth -= 1


def _unless_explicit(skip):
    """transformers' `_ignore_causal_mask_sdpa`, answering False inside `explicit_masks` (in that thread)."""
    @functools.wraps(skip)
    def ignore_causal_mask_sdpa(*args, **kwargs):
        return False if getattr(_EXPLICIT, "depth", 0) else skip(*args, **kwargs)

    ignore_causal_mask_sdpa.meft_fx_explicit = True
    return ignore_causal_mask_sdpa


def _inside(node: fx.Node, layers) -> bool:
    return node.op == "call_function" and any(p == L or p.startswith(L + ".") for p in module_paths(node) for L in layers)


def _cone(ends, inside):
    """(nodes inside the layers that `ends` are computed by, the values from outside they read)."""
    members, boundary, todo = set(), [], list(ends)
    while todo:
        n = todo.pop()
        if n in members or n in boundary:
            continue
        if n.op == "get_attr" or inside(n):
            members.add(n)
            todo.extend(n.all_input_nodes)
        else:
            boundary.append(n)
    return members, boundary


def _symbols(x: fx.Node) -> dict:
    """{size symbol: dimension} of the stack input's shape (batch, sequence, ...)."""
    shape = x.meta["val"].shape
    return {s.node.expr: d for d, s in enumerate(shape) if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol}

