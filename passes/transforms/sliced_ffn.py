"""A gated FFN of a reversible coupling runs in slices of its intermediate width, not chunks of tokens.

In a position-wise half (the FFN sub-block a reversible backward recomputes), the bias-free gated FFN

    down = linear(gated_act(linear(x, W_gate), linear(x, W_up), kind), W_down)

(or with gate and up fused in one weight, `gate, up = linear(x, W_gate_up).chunk(2, -1)` as Phi-3 has it:
the two halves of W_gate_up are then views of it) whose output reaches the half's output only through additions (and casts; first, on a single path,
multiplications by numbers: a scaled residual branch, whose factor the call takes as `cot_scale`) becomes
one call of `meft_fx.nn.sliced_ffn.sliced_gated_ffn(x, W_gate, W_up, W_down, kind, chunk_bytes)`:
each slice of the intermediate units runs over all tokens, its tensors within `chunk_bytes`, and in the
backward's recompute each slice makes its share of d x at once (see that module). The half then needs no
chunks of tokens for its FFN: `build_couplings` calls this on the halves it chunks and sizes their token
chunks by what is left (the compiled path, which runs the plain ops, keeps token chunks of the FFN's width).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from meft_fx.nn.gated import gated_act
from meft_fx.nn.sliced_ffn import sliced_gated_ffn

from ..fx.provenance import replace_node, stamp

#: `build_couplings` slices to `recompute_chunk_bytes / SLICE_SHARE`: a slice, unlike a chunk of tokens, reads no
#: weight twice, so thinner slices cost little. SmolLM2-135M (30 layers, 1024 tokens, fp32): one training step's
#: activation peak 63.1 MiB with 3 MiB slices, 59.3 MiB with 1.5 MiB (then attention's recompute is the peak; 0.75
#: MiB gives the same), step time 6.21 → 6.35 s (medians of 4, alternating).
SLICE_SHARE = 2

PASS = "sliced_ffn"
_LINEAR = {torch.ops.aten.linear.default}
_PASS_THROUGH = {torch.ops.aten.add.Tensor, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}


def _reaches_output_by_adds(n: fx.Node) -> bool:
    """Does `n` reach the graph's output only through additions and dtype casts? Then the gradient it
    receives is the output's cotangent (cast), which the backward offers ahead."""
    frontier, seen = [n], set()
    while frontier:
        m = frontier.pop()
        for u in m.users:
            if u.op == "output":
                continue
            if u.op != "call_function" or u.target not in _PASS_THROUGH or u.kwargs.get("alpha", 1) != 1:
                return False
            if u not in seen:
                seen.add(u)
                frontier.append(u)
    return True


_MUL = {torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar}


def _constant_factor(u: fx.Node, m: fx.Node) -> float | None:
    """c when `u` is m · c (or c · m) for a number c, else None."""
    if u.op != "call_function" or u.target not in _MUL or len(u.args) != 2 or u.kwargs:
        return None
    if m not in u.args:
        return None
    other = u.args[1] if u.args[0] is m else u.args[0]
    ok = isinstance(other, (int, float)) and not isinstance(other, bool)
    return float(other) if ok else None


def _cotangent_scale(n: fx.Node) -> float | None:
    """The factor by which the graph output's cotangent reaches `n`, when `n` reaches the output through
    multiplications by numbers on a single path (a scaled residual branch: Granite's `residual_multiplier`),
    then additions and casts; None when it does not (a norm, another user of `n`: the offered cotangent
    would not be the gradient `n` receives)."""
    scale, m = 1.0, n
    while len(m.users) == 1 and (factor := _constant_factor(next(iter(m.users)), m)) is not None:
        scale, m = scale * factor, next(iter(m.users))
    return scale if _reaches_output_by_adds(m) else None


def _bias_free_linear(n, only_user) -> tuple | None:
    """(input, weight get_attr) of `linear(input, weight)` without bias used only by `only_user`, else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in _LINEAR:
        return None
    if len(n.args) != 2 or n.kwargs or set(n.users) != {only_user} or n.args[1].op != "get_attr":
        return None
    return n.args


def _fused_halves(gm: fx.GraphModule, a: fx.Node, b: fx.Node, g: fx.Node):
    """(x, weight, rows of a half, half of a, half of b, nodes to erase) when a, b are the two equal halves of
    `linear(x, W).chunk(2, -1)` used only by `g`, else None."""
    if not all(n.op == "call_function" and n.target is operator.getitem and set(n.users) == {g} for n in (a, b)):
        return None
    chunk = a.args[0]
    if chunk is not b.args[0] or chunk.op != "call_function" or chunk.target is not torch.ops.aten.chunk.default:
        return None
    rank = len(getattr(chunk.args[0].meta.get("val"), "shape", ()))
    if chunk.args[1:] not in ((2, -1), (2, rank - 1)) or {a.args[1], b.args[1]} != {0, 1} or set(chunk.users) != {a, b}:
        return None
    lin = _bias_free_linear(chunk.args[0], chunk)
    rows = _rows(gm, lin[1]) if lin is not None else None
    if rows is None or rows % 2:  # (an odd width: chunk's halves differ in size)
        return None
    return lin[0], lin[1], rows // 2, a.args[1], b.args[1], (a, b, chunk, chunk.args[0])


def _rows(gm: fx.GraphModule, w: fx.Node) -> int | None:
    """The row count of parameter `w` (a get_attr node), or None when it is not a parameter."""
    try:
        return gm.get_parameter(w.target).shape[0]
    except AttributeError:
        return None


def _half_of(gm: fx.GraphModule, w: fx.Node, rows: int, half: int, before: fx.Node) -> fx.Node:
    """A node of rows [half · rows, (half + 1) · rows) of weight `w` (a view: no copy)."""
    with gm.graph.inserting_before(before):
        return stamp(gm.graph.call_function(torch.ops.aten.slice.Tensor, (w, 0, half * rows, (half + 1) * rows)), PASS)


def _match(gm: fx.GraphModule, down: fx.Node):
    """(x, w_gate, w_up, w_down, kind, cotangent scale, nodes to erase, weights read) when `down` ends a
    bias-free gated FFN, else None."""
    lin = _bias_free_linear(down, next(iter(down.users), None)) if len(down.users) == 1 else None
    scale = _cotangent_scale(down) if lin is not None else None
    if lin is None or down.args[1].op != "get_attr" or scale is None:
        return None  # (elsewhere, e.g. before a post-norm, the cotangent offered ahead would not be its own)
    g = lin[0]
    if g.op != "call_function" or g.target is not gated_act or set(g.users) != {down} or len(g.args) != 3:
        return None
    if g.args[0] is g.args[1]:
        return None
    fused = _fused_halves(gm, g.args[0], g.args[1], g)
    if fused is not None:
        x, w, rows, ha, hb, dead = fused
        wa, wb = _half_of(gm, w, rows, ha, down), _half_of(gm, w, rows, hb, down)
        return x, wa, wb, down.args[1], g.args[2], scale, (g, *dead), {w.target, down.args[1].target}
    a, b = _bias_free_linear(g.args[0], g), _bias_free_linear(g.args[1], g)
    if a is None or b is None or a[0] is not b[0]:
        return None
    return a[0], a[1], b[1], down.args[1], g.args[2], scale, (g, g.args[0], g.args[1]), {a[1].target, b[1].target,
                                                                                    down.args[1].target}


def sliced_ffn(gm: fx.GraphModule, chunk_bytes: int) -> set:
    """Rewrite every bias-free gated FFN of `gm` (see the module docstring), in place; returns the
    parameter targets the sliced calls read (their widths no longer bound the half's token chunks)."""
    taken = set()
    for down in list(gm.graph.nodes):
        m = _match(gm, down) if down.op == "call_function" and down.target in _LINEAR else None
        if m is None:
            continue
        x, wg, wu, wd, kind, scale, dead, weights = m
        args = (x, wg, wu, wd, kind, int(chunk_bytes)) + ((scale,) if scale != 1.0 else ())
        replace_node(gm, down, "call_function", sliced_gated_ffn, args, PASS)
        for n in dead:
            gm.graph.erase_node(n)
        taken |= weights
    if taken:
        gm.graph.lint()
        gm.recompile()
    return taken
