"""`to_networkx`: a converted model's couplings as a networkx DiGraph."""
from __future__ import annotations

from collections import OrderedDict

import networkx as nx
import torch.fx as fx
from torch import nn

from .explain import explain
from .graphs import converted_modules, stack_calls


def to_networkx(model: nn.Module, estimate_memory: bool = True) -> nx.DiGraph:
    """The rewritten program as a `networkx.DiGraph`, one node per coupling.

    Granularity: couplings, not ops (for the ops of a program use `graphs()` and
    `meft_fx.passes.fx.dataflow.data_dag`). Nodes, each with a ``kind`` attribute:

    - ``"coupling{i}"`` (kind ``"coupling"``, i as in `meft_fx.explain`): ``index``, ``stack``
      (module path of its ReversibleStack), ``layer`` (source module path), ``F`` and ``G``
      (lists of (source module path, block kind) with kind attention / ffn / adapter),
      ``adapters`` ({"F": [...], "G": [...]} adapter module names), ``lam``, ``beta``, ``swap``,
      ``numerics``, ``activation_bytes_saved_per_token`` (None unless `estimate_memory`),
      ``f_context`` and ``g_context`` (names of the context inputs F and G read);
    - ``"{S}input"`` (kind ``"stream_input"``): the stream state entering the stack (h1 = h2 = it),
      with ``node`` (its name in the final graph), ``stack`` and ``owner`` (the source module
      that was replaced, e.g. "bert.encoder");
    - ``"{S}output"`` (kind ``"stream_output"``): what leaves the stack, ``stream`` = "h1", "h2"
      or "mean" (the stream that carries the pretrained chain, unless configured otherwise);
    - ``"{S}context/{name}"`` (kind ``"context"``): a value every layer reads unchanged (mask,
      sizes, rotary tables), ``node`` = its name in the final graph.

    ``{S}`` is "" for a model with one stack, else "stack{k}/". Edges: ``kind="stream"`` from the
    input through the couplings in order to the output, with ``streams`` = ("h1", "h2") (the pair
    flows; a coupling with ``swap`` exchanges them), and ``kind="context"`` from a context node to
    each coupling that reads it, with ``used_by`` = ("F",), ("G",) or ("F", "G"). Graph attributes:
    ``method``, ``numerics``, ``model`` (class name), ``num_couplings``.
    """
    rep = explain(model, estimate_memory=estimate_memory)
    by_stack: OrderedDict = OrderedDict()
    for c in rep.couplings:
        by_stack.setdefault(c.stack, []).append(c)
    owners = {p: (c.owner or p) for p, c in converted_modules(model)}
    g = nx.DiGraph(method=rep.method, numerics="/".join(sorted({c.numerics for c in rep.couplings})),
                   model=type(model).__name__, num_couplings=len(rep.couplings))
    for k, (spath, infos) in enumerate(by_stack.items()):
        pre = f"stack{k}/" if len(by_stack) > 1 else ""
        _add_stack(g, model, spath, infos, pre, owners)
    return g


def _stack_call_args(model: nn.Module, spath: str, stack) -> tuple:
    """(stream input name, context input names) of the stack at `spath`, read from its call in the parent graph."""
    parent_path, _, child = spath.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    call = next((n for n, s in stack_calls(parent) if n.target == child), None) if isinstance(parent, fx.GraphModule) else None
    names = [a.name if isinstance(a, fx.Node) else repr(a) for a in (call.args if call is not None else ())]
    ctx_names = names[1:] if names else [f"ctx_{j}" for j in range(stack.num_context)]
    return (names[0] if names else ""), ctx_names


def _owner_of(owners: dict, spath: str) -> str:
    """The source module replaced by the converted module that holds the stack at `spath` ("" if none)."""
    owner = max((p for p in owners if p == "" or spath.startswith(p + ".")), key=len, default=None)
    return owners.get(owner, "") if owner is not None else ""


def _add_stack(g: nx.DiGraph, model: nn.Module, spath: str, infos: list, pre: str, owners: dict) -> None:
    """Add one stack's input, context, coupling and output nodes (names prefixed by `pre`) and their edges to `g`."""
    stack = model.get_submodule(spath)
    input_name, ctx_names = _stack_call_args(model, spath, stack)
    inp, outp = f"{pre}input", f"{pre}output"
    owner = _owner_of(owners, spath)
    g.add_node(inp, kind="stream_input", stack=spath, owner=owner, node=input_name,
               label="h1 = h2 = input")
    for name in ctx_names:
        g.add_node(f"{pre}context/{name}", kind="context", stack=spath, node=name, label=name)
    prev = inp
    for c, info in zip(stack.couplings, infos):
        node = _add_coupling(g, c, info, spath, ctx_names)
        g.add_edge(prev, node, kind="stream", streams=("h1", "h2"))
        _add_context_edges(g, c, node, pre, ctx_names)
        prev = node
    out_stream = {0: "h1", 1: "h2"}.get(stack.out_index, "mean")
    g.add_node(outp, kind="stream_output", stack=spath, owner=owner, stream=out_stream, label=f"output = {out_stream}")
    g.add_edge(prev, outp, kind="stream", streams=("h1", "h2") if out_stream == "mean" else (out_stream,))


def _add_coupling(g: nx.DiGraph, c, info, spath: str, ctx_names: list) -> str:
    """Add the node of coupling `c` (described by `info`) to `g` and return its name."""
    node = f"coupling{info.index}"
    g.add_node(node, kind="coupling", index=info.index, stack=spath, layer=info.layer, F=list(info.F), G=list(info.G),
               adapters=dict(info.adapters), lam=info.lam, beta=info.beta, swap=info.swap, numerics=info.numerics,
               activation_bytes_saved_per_token=info.activation_bytes_saved_per_token,
               f_context=[ctx_names[j] for j in c.f_context], g_context=[ctx_names[j] for j in c.g_context])
    return node


def _add_context_edges(g: nx.DiGraph, c, node: str, pre: str, ctx_names: list) -> None:
    """Add an edge from each context node that coupling `c` reads to its node, with the halves that read it."""
    for j in sorted(set(c.f_context) | set(c.g_context)):
        used = tuple(h for h, idx in (("F", c.f_context), ("G", c.g_context)) if j in idx)
        g.add_edge(f"{pre}context/{ctx_names[j]}", node, kind="context", used_by=used)
