"""A gated FFN `down(act(gate(x)) * up(x))` run in slices of its intermediate width, not chunks of tokens.

A reversible backward recomputes every FFN, and its intermediate tensors (tokens × intermediate size, the
widest of a decoder layer) must not all be alive at once. Chunks of tokens bound them, but every chunk
runs every weight again (a BLAS packs the weight for each product: two chunks cost ~10 % more FFN time
on a CPU). Slices of the intermediate width bound them as well, with every product over all tokens and
every weight element used once:

    out = Σ_s down[:, s] · (act(gate[s] · x) ∘ up[s] · x)          (s: a slice of the intermediate units)

In the backward's recompute the cotangent of the block is known before the FFN runs
(`meft_fx.runtime.replay`), and when the FFN's output reaches the block's output through additions
only, that cotangent is the FFN output's own. `meft_fx.runtime.ahead` hands it over: each slice then computes
its share of the output and of d x at once, and the backward returns the d x it made — after checking
that the gradient arriving is that cotangent (`torch.equal`), recomputing from the gradient otherwise.
So the recompute and back-propagation run the FFN's matmuls once each, as an unsliced FFN does.

Slices are chosen so that one intermediate tensor of a slice takes at most `chunk_bytes`; the forward and
the recompute slice the same way, so the output bits are the same. With one slice, or trainable FFN
weights, or under torch.compile/export, it is the plain ops. The `sliced_ffn` pass puts it in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime.ahead import cotangent_ahead, take_cotangent
from .gated import ACTIVATIONS, gated_act

__all__ = ["sliced_gated_ffn", "cotangent_ahead", "slices_for"]

def slices_for(tokens: int, width: int, itemsize: int, chunk_bytes: int) -> list[slice]:
    """Equal slices of `width` intermediate units, each (tokens × slice) within `chunk_bytes` (at least one unit)."""
    most = max(1, int(chunk_bytes) // max(1, tokens * itemsize))
    n = -(-width // most)
    step = -(-width // n)
    return [slice(i, min(i + step, width)) for i in range(0, width, step)]


def _add_product(acc, a, b):
    """acc + a·b in place (acc None: a·b); under autocast a product then an add (in-place addmm is not cast)."""
    if acc is None:
        return a.mm(b)
    return acc.add_(a.mm(b)) if torch.is_autocast_enabled(a.device.type) else acc.addmm_(a, b)


def _slice_out(x, w_gate, w_up, w_down, kind, s, out):
    """act(x·gate[s]ᵀ) ∘ (x·up[s]ᵀ), its share added into `out` (None: the first slice makes it); returns
    (out, gate, act(gate), up) — the same kernels in every path, so the same bits."""
    a, b = F.linear(x, w_gate[s]), F.linear(x, w_up[s])
    sa = ACTIVATIONS[kind][0](a)
    h = sa * b
    return _add_product(out, h, w_down[:, s].t()), a, sa, b


def _forward(x2, w_gate, w_up, w_down, kind, slices):
    out = None
    for s in slices:
        out = _slice_out(x2, w_gate, w_up, w_down, kind, s, out)[0]
    return out


def _forward_and_vjp(x2, w_gate, w_up, w_down, kind, slices, cot):
    """(output, d x) in one pass over the slices, for a known output cotangent `cot`."""
    out, d_x = None, None
    act_backward = ACTIVATIONS[kind][1]
    for s in slices:
        out, a, sa, b = _slice_out(x2, w_gate, w_up, w_down, kind, s, out)
        d_h = cot.mm(w_down[:, s])
        d_b = sa.mul_(d_h)                 # act(a) ∘ d_h, over act(a)
        d_a = act_backward(d_h.mul_(b), a)  # act'(a) ∘ (d_h ∘ b), over d_h
        d_x = _add_product(_add_product(d_x, d_a, w_gate[s]), d_b, w_up[s])
        del a, sa, b, d_h, d_a, d_b  # before the next slice's: one slice's tensors alive at a time
    return out, d_x.to(x2.dtype)  # autocast: x's own dtype, as autograd through the cast gives it


class SlicedGatedFFN(torch.autograd.Function):
    """The FFN over 2-D rows x, weights without gradients; d x made ahead when the cotangent is known."""

    @staticmethod
    def forward(ctx, x2, w_gate, w_up, w_down, kind, slices, cot_scale=1.0):
        cot = take_cotangent(x2.shape[0], w_down.shape[0], x2.dtype)
        if cot is not None and cot_scale != 1.0:
            cot = cot * cot_scale  # what the scaled branch's MulBackward makes of it
        ctx.kind, ctx.slices, ctx.cot = kind, slices, cot
        dev = x2.device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        ctx.save_for_backward(x2, w_gate, w_up, w_down)
        if cot is None:
            ctx.d_x = None
            return _forward(x2, w_gate, w_up, w_down, kind, slices)
        out, ctx.d_x = _forward_and_vjp(x2, w_gate, w_up, w_down, kind, slices, cot)
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, w_gate, w_up, w_down = ctx.saved_tensors
        if ctx.d_x is not None and (grad is ctx.cot or torch.equal(grad, ctx.cot.to(grad.dtype))):
            d_x = ctx.d_x
        else:  # the cotangent handed over was not this output's: recompute from the gradient
            dev, dtype, enabled = ctx.autocast
            with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                d_x = _forward_and_vjp(x2, w_gate, w_up, w_down, ctx.kind, ctx.slices, grad)[1]
        ctx.d_x = ctx.cot = None
        return d_x, None, None, None, None, None, None


def sliced_gated_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     kind: str = "silu", chunk_bytes: int = 3 << 20, cot_scale: float = 1.0) -> torch.Tensor:
    """`linear(act(linear(x, w_gate)) * linear(x, w_up), w_down)` (bias-free; act one of gated.ACTIVATIONS),
    in slices of the intermediate width each of whose tensors takes at most `chunk_bytes`. `cot_scale`: the
    output reaches the block's output multiplied by this number (a scaled residual branch), so the
    cotangent offered ahead is scaled by it before use."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"sliced_gated_ffn: kind={kind!r}; expected one of {', '.join(map(repr, ACTIVATIONS))}")
    tokens = x.numel() // max(1, x.shape[-1])
    slices = slices_for(tokens, w_gate.shape[0], x.element_size(), chunk_bytes)
    # the same choice with and without grad (a forward and its recompute must give the same bits)
    if len(slices) == 1 or torch.compiler.is_compiling() or any(w.requires_grad for w in (w_gate, w_up, w_down)):
        return F.linear(gated_act(F.linear(x, w_gate), F.linear(x, w_up), kind), w_down)
    x2 = x.reshape(tokens, x.shape[-1])
    if torch.is_grad_enabled() and x.requires_grad:
        out = SlicedGatedFFN.apply(x2, w_gate, w_up, w_down, kind, slices, float(cot_scale))
    else:
        with torch.no_grad():
            out = _forward(x2, w_gate, w_up, w_down, kind, slices)
    return out.reshape(*x.shape[:-1], w_down.shape[0])
