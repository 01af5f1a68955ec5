"""A position-wise half reads its batch and sequence sizes off its own input, not from the stack's context.

`hoist_shape_queries` reads every size off a graph input, so a half cut out of the graph (GPT-2's and
OPT's FFN reshape `x @ W` back to (batch, sequence, width)) takes those sizes as context. A chunk of
tokens is (1, rows, width), so such a half could not run in chunks. When a context size is exactly one
of the half's input dimensions (the same symbol, and no other dimension has it), this pass reads it
off the input instead — `sym_size(stream, d)` — and the half stops taking it; run over a chunk, the
half then reshapes to the chunk's own sizes. `build_couplings` calls it on the position-wise halves.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..fx.dataflow import node_value
from ..fx.provenance import stamp

PASS = "local_sizes"


def _expr(v) -> str | None:
    node = getattr(v, "node", None)
    expr = getattr(node, "expr", None)
    return None if expr is None or str(expr).isdigit() else str(expr)


def local_sizes(half: fx.GraphModule) -> list[int]:
    """Rewrite `half` (placeholders: stream, then its context) in place; returns the positions, among its
    context, of the sizes it now reads off the stream (the caller stops passing them)."""
    stream, *context = half.graph.find_nodes(op="placeholder")
    dims = [_expr(d) for d in getattr(node_value(stream), "shape", ())]
    removed = []
    for pos, ph in enumerate(context):
        value = node_value(ph)
        e = _expr(value) if isinstance(value, torch.SymInt) else None
        if e is None or dims.count(e) != 1:
            continue
        with half.graph.inserting_after(stream):
            size = stamp(half.graph.call_function(torch.ops.aten.sym_size.int, (stream, dims.index(e))), PASS)
        size.meta["val"] = value
        ph.replace_all_uses_with(size)
        half.graph.erase_node(ph)
        removed.append(pos)
    if removed:
        half.graph.lint()
        half.recompile()
    return removed
