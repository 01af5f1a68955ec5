"""A position-wise half reads its batch and sequence sizes off its own input, not from the stack's context.

`hoist_shape_queries` reads every size off a graph input, so a half cut out of the graph takes those sizes,
and what is built from them alone, as context: GPT-2's and OPT's FFN reshape `x @ W` back to (batch,
sequence, width); Mixtral's experts view their rows as (batch · sequence, top-k, width) and invert their
routing permutation with `arange(top-k · batch · sequence)`. A chunk of tokens is (1, rows, width), so such a
half could not run in chunks. This pass rebuilds such context inside the half from the half's own input:

- a size c · s_a · s_b ··· (an integer times distinct symbols, each the symbol of exactly one of the
  input's dimensions and of no other) becomes c · sym_size(stream, a) · sym_size(stream, b) ···;
- a tensor made by a factory that draws nothing (`arange`, `zeros`, `ones`, `full`, `empty`) from sizes that
  are token counts (c times the product of all the input's token dimensions) is made again in the half from
  the rebuilt sizes — a chunk's own `arange(top-k · tokens)` indexes its own rows; `arange(sequence)` (a
  position) would restart in every chunk, so it stays context;

and the half stops taking it. Run over a chunk, the half then reshapes to, and counts, the chunk's own
tokens. A size it cannot rebuild (one symbol standing for two dimensions: which one was meant is unknown;
a token dimension of fixed size above 1, which a coefficient could stand for) stays context.
`build_couplings` calls it on the position-wise halves.
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from ..fx.dataflow import node_value, size_expr
from ..fx.provenance import stamp

PASS = "local_sizes"
_aten = torch.ops.aten
#: tensor factories that take sizes and draw no random numbers: safe to run again inside the half
SIZE_FACTORIES = {_aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.zeros.default,
                  _aten.ones.default, _aten.full.default, _aten.empty.memory_format}


def _expr(v):
    """The sympy expression of a SymInt (None for a plain int, a SymInt of known value or anything else)."""
    expr = size_expr(v) if isinstance(v, torch.SymInt) else None
    return None if expr is None or expr.is_number else expr


class _Rebuilder:
    """Emits, before the half's first computation, the nodes that rebuild sizes (and size-only tensors)
    from the half's input; every method returns None when the value cannot be rebuilt."""

    def __init__(self, half: fx.GraphModule, stream: fx.Node):
        self.graph, self.stream = half.graph, stream
        self.shape = list(getattr(node_value(stream), "shape", ()))
        exprs = [_expr(d) for d in self.shape]
        self.dims = {e: exprs.index(e) for e in exprs if isinstance(e, sympy.Symbol) and exprs.count(e) == 1}
        # a token dimension of fixed size > 1 (batch pinned by the program): a coefficient could stand for it
        self.fixed = any(not isinstance(d, torch.SymInt) and int(d) != 1 for d in self.shape[:-1])
        self.token_dims = sorted(d for d, e in enumerate(exprs[:-1]) if e is not None)
        self.anchor = next(n for n in half.graph.nodes if n.op != "placeholder")
        self.made: dict = {}
        self.emitted: list[fx.Node] = []

    def _emit(self, target, args, val, kwargs=None):
        with self.graph.inserting_before(self.anchor):
            node = stamp(self.graph.call_function(target, tuple(args), kwargs or {}), PASS)
        node.meta["val"] = val
        self.emitted.append(node)
        return node

    def drop_unused(self) -> None:
        """Erase what was emitted and is read by nothing (sizes of a tensor that could not be rebuilt)."""
        for node in reversed(self.emitted):
            if not node.users:
                self.graph.erase_node(node)

    def _factors(self, expr):
        """(c, [dims]) of expr = c · s_a · s_b ···, each s the symbol of exactly one input dimension; else None."""
        coef, dims = 1, []
        for factor in sympy.Mul.make_args(expr):
            if factor.is_Integer:
                coef *= int(factor)
            elif factor in self.dims and self.dims[factor] not in dims:
                dims.append(self.dims[factor])
            else:
                return None
        return (coef, dims) if dims else None

    def size(self, value):
        """A node computing the SymInt `value` from the stream's sizes, or None."""
        expr = _expr(value)
        if expr is None or self.fixed:
            return None
        if expr in self.made:
            return self.made[expr]
        factors = self._factors(expr)
        if factors is None:
            return None
        coef, dims = factors
        node = None
        for d in dims:
            term = self._emit(_aten.sym_size.int, (self.stream, d), self.shape[d])
            node = term if node is None else self._emit(operator.mul, (node, term), node.meta["val"] * self.shape[d])
        if coef != 1:
            node = self._emit(operator.mul, (coef, node), value)
        node.meta["val"] = value
        self.made[expr] = node
        return node

    def tensor(self, source: fx.Node | None):
        """A copy of `source` (the context's node in the whole graph) when it is a size factory whose node
        arguments are all sizes this half can rebuild; else None."""
        if source is None or source.op != "call_function" or source.target not in SIZE_FACTORIES:
            return None
        mapped = {}
        for a in source.all_input_nodes:  # token counts only: arange(sequence) in a chunk would restart at 0
            expr = _expr(node_value(a))
            factors = self._factors(expr) if expr is not None else None
            if factors is None or sorted(factors[1]) != self.token_dims:
                return None
            mapped[a] = self.size(node_value(a))
            if mapped[a] is None:
                return None
        args, kwargs = fx.map_arg((source.args, source.kwargs), mapped.__getitem__)
        return self._emit(source.target, args, node_value(source), kwargs)


def local_sizes(half: fx.GraphModule, sources=None) -> list[int]:
    """Rewrite `half` (placeholders: stream, then its context) in place; returns the positions, among its
    context, of the values it now rebuilds from the stream (the caller stops passing them).

    `sources`: the context's nodes in the graph the half was cut from (in the half's placeholder order),
    needed to rebuild size-only tensors; without them only sizes are rebuilt."""
    stream, *context = half.graph.find_nodes(op="placeholder")
    sources = list(sources) if sources is not None else [None] * len(context)
    rebuild = _Rebuilder(half, stream)
    removed = []
    for pos, (ph, source) in enumerate(zip(context, sources)):
        value = node_value(ph)
        local = rebuild.size(value) if isinstance(value, torch.SymInt) else rebuild.tensor(source)
        if local is None:
            continue
        ph.replace_all_uses_with(local)
        half.graph.erase_node(ph)
        removed.append(pos)
    rebuild.drop_unused()
    if removed:
        half.graph.lint()
        half.recompile()
    return removed
