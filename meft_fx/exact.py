"""Exact numerics (`MEFTConfig(numerics="exact")`): fixed-point streams, bit-exact reversible backward.

Both streams are int64 fixed point (`meft_fx.fixed_point`, `stack.frac_bits` fractional bits);
λ = 2^-k1 and β = 2^-k2. Per coupling (F and G run in the model's dtype — the dtype of the stack's
input — on the dequantized stream, under whatever autocast is active):

    y1q = (x1q >> k1) + quantize(F(dequantize(x2q)))       rem1 = x1q's k1 low bits (packed)
    y2q = (x2q >> k2) + quantize(G(dequantize(y1q)))       rem2 = x2q's k2 low bits (packed)

Integer addition loses nothing and the shifted-out bits are kept, so the backward rebuilds every
coupling's inputs bit for bit at any depth, in fp32, bf16 or under autocast:

    x2q = shift_up(y2q − quantize(G(dequantize(y1q))), rem2)    (G recomputed with grad)
    x1q = shift_up(y1q − quantize(F(dequantize(x2q))), rem1)    (F recomputed with grad)

Quantization is straight-through in the backward, so the gradients follow the float formulas
(dy1 += Gᵀdy2; dx2 = β·dy2 + Fᵀdy1; dx1 = λ·dy1); the stream gradients dy1/dy2 are kept in at
least fp32 (F and G still backprop in the model's dtype), in the reversible backward and in the
reference alike, so that bf16 models get the same gradients from both. The forward keeps the two top int64 streams,
k1 + k2 bits per element per coupling, the RNG states for dropout replay and a 64-bit checksum of
each coupling's two input streams; the backward compares the rebuilt inputs against those
checksums and raises `ReconstructionError` if F or G gave different bits in the recompute (a
non-deterministic kernel, random numbers outside the torch RNG, parameters changed between
forward and backward, ...), instead of returning wrong gradients.

Three ways a stack with exact numerics runs, all with the same fixed-point arithmetic:

* reversible and grad enabled (training): `_ExactFunction`, nothing cached inside the stack;
* `reversible=False` with grad: ordinary autograd through the same integer streams, each float
  stream carrying the gradient straight through the quantization — the reference the reversible
  backward is tested against;
* no grad (eval, inference): the integer forward alone.
"""
from __future__ import annotations

import torch

from . import fixed_point as fxp
from .coupling import (_Grads, _RNG, _add, _autocast_state, _half_backward, _output_grads, _restore_context,
                       _save_context, _scale, step)
from .errors import ReconstructionError

__all__ = ["run_exact_stack", "stored_bits_per_element"]


def run_exact_stack(stack, x: torch.Tensor, context) -> torch.Tensor:
    """`ReversibleStack.forward` for `stack.numerics == "exact"`."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"an exact ReversibleStack takes a floating-point stream, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    params = stack._function_inputs(x, context)
    if params is not None:
        return _ExactFunction.apply(stack, len(context), x, *context, *params)
    return _autograd_forward(stack, x, context)


def stored_bits_per_element(stack) -> int:
    """Remainder bits the reversible forward keeps per stream element, summed over the couplings."""
    return sum(k1 + k2 for k1, k2 in (c.exponents for c in stack.couplings))


# ----------------------------------------------------------------------------- integer helpers

def _where(stack, i: int) -> str:
    layer = stack.couplings[i].info.get("layer")
    return f"coupling {i}" + (f" ({layer})" if layer else "")


def _quantize(out: torch.Tensor, frac_bits: int, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"{what} must return a floating-point tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    try:
        return fxp.quantize(out, frac_bits)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _update(prev_q: torch.Tensor, k: int, out_q: torch.Tensor, what: str) -> torch.Tensor:
    """(prev_q >> k) + out_q, overflow-checked (the shift's remainder is not kept)."""
    return fxp._add_checked(prev_q >> k if k else prev_q, out_q, what)


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the streams' gradients: at least fp32 (the streams themselves are 64-bit).

    Keeping dy1/dy2 in fp32 for bf16/fp16 models (F/G still backprop in the model's dtype) makes the
    reversible backward and the `reversible=False` reference add the same numbers in the same
    precision; in bf16, re-associated sums would otherwise differ by ~2^-8 per layer.
    """
    return torch.float32 if dtype.itemsize < 4 else dtype


def _straight_through(carrier: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` exactly, with the gradient of `carrier` (identity, cast to the carrier's dtype).

    The bit-exact form of x + (q(x) − x).detach(): value + (carrier − carrier) is value itself.
    """
    return value.detach() + (carrier - carrier.detach()).to(value.dtype)


# ----------------------------------------------------------------------------- non-reversible paths

def _autograd_forward(stack, x: torch.Tensor, context) -> torch.Tensor:
    """The exact arithmetic without the reversible Function.

    With grad enabled (`reversible=False`, the reference), each stream is an int64 tensor plus a
    float carrier in `_grad_dtype` that only carries the gradient of the float equations: F, G and
    the output see the dequantized int64 streams, attached to the carriers straight-through. So
    autograd computes exactly what the reversible backward computes.
    """
    fb, dtype = stack.frac_bits, x.dtype
    track = torch.is_grad_enabled()
    gd = _grad_dtype(dtype)

    def deq(q, carrier):
        v = fxp.dequantize(q, fb, dtype)
        return _straight_through(carrier, v) if track else v

    hq = _quantize(x, fb, "the stack's input")
    h1q = h2q = hq
    h1c = h2c = x.to(gd) if track else None
    for i, c in enumerate(stack.couplings):
        k1, k2 = c.exponents
        where = _where(stack, i)
        f = c.f(deq(h2q, h2c), context)
        y1q = _update(h1q, k1, _quantize(f, fb, f"{where}: F"), f"{where}: y1 = λ·x1 + F(x2)")
        y1c = step(c.lam, h1c, f.to(gd)) if track else None
        g = c.g(deq(y1q, y1c), context)
        y2q = _update(h2q, k2, _quantize(g, fb, f"{where}: G"), f"{where}: y2 = β·x2 + G(y1)")
        y2c = step(c.beta, h2c, g.to(gd)) if track else None
        h1q, h2q, h1c, h2c = (y2q, y1q, y2c, y1c) if c.swap else (y1q, y2q, y1c, y2c)
    return stack.select(deq(h1q, h1c), deq(h2q, h2c))


# ----------------------------------------------------------------------------- the reversible Function

def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _checksums(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    return fxp.checksum(a), fxp.checksum(b)


def _mismatch(stack, i: int, got: tuple[int, int], want: tuple[int, int]) -> ReconstructionError:
    c = stack.couplings[i]
    culprit = "G (stream 2 is rebuilt with G)" if got[1] != want[1] else "F (stream 1 is rebuilt with F)"
    return ReconstructionError(
        f"exact reversible backward: the inputs of {_where(stack, i)} rebuilt from its outputs differ from the ones "
        f"the forward saw (checksum mismatch); {culprit} returned different bits in the backward's recompute than in "
        f"the forward, i.e. it is not deterministic (a non-deterministic kernel, random numbers drawn outside the "
        f"torch RNG, a kernel chosen differently with grad enabled, or parameters/modules changed between forward and "
        f"backward). Gradients would be wrong, so none are returned. Fix: make F/G deterministic "
        f"(torch.use_deterministic_algorithms(True), disable the non-deterministic kernels, do not update parameters "
        f"before backward), or convert with MEFTConfig(numerics='float') (no exactness, no check). "
        f"[{type(c.F).__name__}/{type(c.G).__name__}, λ={c.lam:g} β={c.beta:g}]")


def _unshift(out_q: torch.Tensor, r: torch.Tensor, rem: torch.Tensor, k: int, frac_bits: int,
             stack, i: int, what: str) -> torch.Tensor:
    """prev = shift_up(out_q − quantize(r), rem): the exact inverse of `_update`."""
    diff = out_q - _quantize(r, frac_bits, f"{_where(stack, i)}: {what} (recompute)")
    try:
        return fxp.shift_up(diff, rem, k)
    except RuntimeError as e:  # overflow: the recompute cannot have matched the forward
        raise ReconstructionError(f"exact reversible backward, {_where(stack, i)}: {e}; {what} is not "
                                  f"deterministic (see numerics='float' for a non-exact alternative)") from None


class _ExactFunction(torch.autograd.Function):
    """forward: quantize x, run the couplings in integers without grad; keep the two top int64
    streams, the packed remainders, the RNG states and a checksum of each coupling's inputs.
    Output: the selected stream dequantized to x's dtype. backward: fused like `_ReversibleFunction`.

    Inputs are (stack, number of context values, x, *context, *trainable parameters).
    """

    @staticmethod
    def forward(fctx, stack, n_ctx, x, *rest):
        context, params = rest[:n_ctx], rest[n_ctx:]
        fb, dtype = stack.frac_bits, x.dtype
        record_rng = stack.training and stack.has_random
        fctx.autocast = _autocast_state(x.device.type)
        h1q = h2q = _quantize(x, fb, "the stack's input")
        states = []
        for i, c in enumerate(stack.couplings):
            k1, k2 = c.exponents
            where = _where(stack, i)
            sums = _checksums(h1q, h2q)
            rf = _RNG(x.device) if record_rng else None
            f = _quantize(c.f(fxp.dequantize(h2q, fb, dtype), context), fb, f"{where}: F")
            s1, rem1 = fxp.shift_down(h1q, k1)
            y1q = fxp._add_checked(s1, f, f"{where}: y1 = λ·x1 + F(x2)")
            rg = _RNG(x.device) if record_rng else None
            g = _quantize(c.g(fxp.dequantize(y1q, fb, dtype), context), fb, f"{where}: G")
            s2, rem2 = fxp.shift_down(h2q, k2)
            y2q = fxp._add_checked(s2, g, f"{where}: y2 = β·x2 + G(y1)")
            states.append((rf, rg, rem1, rem2, sums))
            h1q, h2q = (y2q, y1q) if c.swap else (y1q, y2q)
        fctx.stack, fctx.states, fctx.params, fctx.dtype, fctx.frac_bits = stack, states, params, dtype, fb
        fctx.x_dtype = x.dtype
        fctx.save_for_backward(h1q, h2q, *_save_context(fctx, context))
        return stack.select(fxp.dequantize(h1q, fb, dtype), fxp.dequantize(h2q, fb, dtype))

    @staticmethod
    def backward(fctx, d_out):
        stack, fb, dtype = fctx.stack, fctx.frac_bits, fctx.dtype
        h1q, h2q, *tctx = fctx.saved_tensors
        context = _restore_context(fctx, tctx)
        grads = _Grads(fctx.n_ctx)
        gd = _grad_dtype(dtype)
        dy1, dy2 = _output_grads(stack, d_out.to(gd))  # stream gradients in at least fp32
        for i in reversed(range(len(stack.couplings))):
            c = stack.couplings[i]
            rf, rg, rem1, rem2, sums = fctx.states[i]
            k1, k2 = c.exponents
            if c.swap:
                h1q, h2q, dy1, dy2 = h2q, h1q, dy2, dy1
            # G half: y2 = β·x2 + G(y1)  →  dy1 += Gᵀdy2, x2q = shift_up(y2q − q(G(y1)), rem2)
            g_args = [context[i_] for i_ in c.g_context]
            x2q, d_y1, pg, ag = _half_backward(c.G, g_args, fxp.dequantize(h1q, fb, dtype), dy2, rg, fctx.autocast,
                                               lambda r: _unshift(h2q, r, rem2, k2, fb, stack, i, "G"), leaf_input=False)
            dy1 = _add(dy1, _cast(d_y1, gd))
            grads.add(pg, ag, c.g_context)
            # F half: y1 = λ·x1 + F(x2)  →  dx2 = β·dy2 + Fᵀdy1, x1q = shift_up(y1q − q(F(x2)), rem1), dx1 = λ·dy1
            f_args = [context[i_] for i_ in c.f_context]
            x1q, d_x2, pg, ag = _half_backward(c.F, f_args, fxp.dequantize(x2q, fb, dtype), dy1, rf, fctx.autocast,
                                               lambda r: _unshift(h1q, r, rem1, k1, fb, stack, i, "F"), leaf_input=False)
            grads.add(pg, ag, c.f_context)
            got = _checksums(x1q, x2q)
            if got != sums:
                raise _mismatch(stack, i, got, sums)
            h1q, h2q, dy1, dy2 = x1q, x2q, _scale(c.lam, dy1), _add(_scale(c.beta, dy2), _cast(d_x2, gd))
        return grads.result(_cast(_add(dy1, dy2), fctx.x_dtype), fctx.params)
