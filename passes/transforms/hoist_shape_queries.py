"""Every symbolic size in the graph is read from a graph input, never from an intermediate tensor.

After this pass, cutting a region out of the graph cannot strand a size query that the rest of the
graph (a mask, a view outside the region) still needs.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..fx.dataflow import node_value
from ..fx.ops import SYM_SIZE_TARGETS
from ..fx.provenance import replace_node

PASS = "hoist_shape_queries"
aten = torch.ops.aten


def _expr(v):
    node = getattr(v, "node", None)
    return str(node.expr) if node is not None and hasattr(node, "expr") else None


def hoist_shape_queries(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite `sym_size(t, d)` of an intermediate `t` to the same size read off a placeholder."""
    index = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        v = node_value(ph)
        for d, s in enumerate(getattr(v, "shape", ()) or ()):
            e = _expr(s)
            if e is not None and not e.isdigit():
                index.setdefault(e, (ph, d))
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in SYM_SIZE_TARGETS or n.target != aten.sym_size.int:
            continue
        src = n.args[0]
        if src.op == "placeholder":
            continue
        e = _expr(node_value(n))
        if e not in index:
            continue
        ph, d = index[e]
        replace_node(gm, n, "call_function", aten.sym_size.int, (ph, d), PASS)
    gm.graph.lint()
    gm.recompile()
    return gm
