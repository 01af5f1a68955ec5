"""Cutting a region of a graph out as a GraphModule of its own `(stream, *context) -> end`."""
from __future__ import annotations

import copy

import torch.fx as fx

from .dataflow import is_data, topo
from .provenance import PROVENANCE_KEY


def extract(gm: fx.GraphModule, nodes: set, stream_in: fx.Node, end: fx.Node, class_name: str, pass_name: str):
    """Copy the region `nodes` (ending in `end`) into a new GraphModule `(stream, *context) -> end`.

    Parameters and buffers (get_attr) and submodules are shared with `gm`, not copied. Every other
    input of the region is a *context* placeholder; returns (module, list of context nodes in `gm`).
    """
    order = topo(gm, nodes)
    # Sizes/flags read off region tensors travel with the region, and so does whatever is computed
    # from them alone (e.g. a causal mask built from x.size(1) in an fx graph): such values do not
    # depend on the stream's data, only on its shape (one pass in topological order, then pruning).
    members = set(order)
    shape_derived: set = set()
    for n in gm.graph.nodes:
        if n in members or n.op in ("placeholder", "get_attr", "output"):
            continue
        if n.op == "call_module" and n.target == "_guards_fn":
            continue
        inside = [a for a in n.all_input_nodes if a in members]
        if inside and (not is_data(n) or all(not is_data(a) or a in shape_derived for a in inside)):
            members.add(n)
            shape_derived.add(n)
    for n in reversed(list(gm.graph.nodes)):
        if n in shape_derived and not any(u in members for u in n.users):
            members.discard(n)
            shape_derived.discard(n)
    order = topo(gm, members)
    context: list = []
    for n in order:
        for a in n.all_input_nodes:
            if a in members or a is stream_in or a.op == "get_attr" or a in context:
                continue
            context.append(a)
    g = fx.Graph()
    env = {stream_in: g.placeholder("stream")}
    env[stream_in].meta = copy.copy(stream_in.meta)
    for i, c in enumerate(context):
        p = g.placeholder(f"ctx_{i}_{c.name}")
        p.meta = copy.copy(c.meta)
        env[c] = p

    def lookup(a):
        if a not in env:
            if a.op == "get_attr":
                env[a] = g.get_attr(a.target)
                env[a].meta = copy.copy(a.meta)
            else:  # pragma: no cover - guarded by the context scan above
                raise KeyError(a.name)
        return env[a]

    for n in order:
        env[n] = g.node_copy(n, lookup)
    g.output(env[end])
    g.lint()
    sub = fx.GraphModule(gm, g, class_name=class_name)
    for n in sub.graph.nodes:
        n.meta.setdefault(PROVENANCE_KEY, n.meta.get(PROVENANCE_KEY, "capture"))
    sub.meta = {PROVENANCE_KEY: pass_name}
    return sub, context
