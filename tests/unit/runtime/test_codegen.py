"""The generated coupling programs (meft_fx.runtime.codegen) in both arithmetics, on hand-made F and G."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meft_fx.runtime import Coupling, FixedPointStreams, FloatStreams
from meft_fx.runtime.fixed_point import DEFAULT_FRAC_BITS, FixedPointOverflow, checksum, dequantize, quantize

DEPTH = 48
INT64_MAX = 2 ** 63 - 1


class _Fn(nn.Module):
    """A block from a plain function (F/G take (stream, *context))."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *context):
        return self.fn(x)


def _mlp(d: int, h: int, dtype: torch.dtype, g: torch.Generator) -> nn.Sequential:
    m = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, d))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return m.to(dtype)


def _chain(dtype, k1, k2, depth=DEPTH, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cs = [Coupling(_mlp(d, 32, dtype, g), _mlp(d, 32, dtype, g), 2.0 ** -k1, 2.0 ** -k2, False) for _ in range(depth)]
    x1 = torch.randn(3, 5, d, generator=g).to(dtype)
    x2 = torch.randn(3, 5, d, generator=g).to(dtype)
    return cs, x1, x2


@pytest.mark.parametrize("k1,k2", [(3, 3), (0, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@torch.no_grad()
def test_exact_programs_rebuild_a_48_coupling_chain_bit_for_bit(dtype, k1, k2):
    exact = FixedPointStreams()
    cs, x1, x2 = _chain(dtype, k1, k2)
    x1q, x2q = quantize(x1, exact.frac_bits), quantize(x2, exact.frac_bits)
    a, b, saved = x1q, x2q, []
    for c in cs:
        a, b, r1, r2 = c.program("forward", exact, 0, dtype)(a, b, None)
        saved.append((r1, r2))
        assert (r1 is None) == (k1 == 0) and (r1 is None or r1.numel() == math.ceil(a.numel() * k1 / 8))
        assert r2.numel() == math.ceil(b.numel() * k2 / 8)
    assert not torch.equal(a, x1q) and not torch.equal(b, x2q)
    top = checksum(a), checksum(b)
    for c, (r1, r2) in zip(reversed(cs), reversed(saved)):  # from the top down, keeping only the residues
        a, b = c.program("inverse", exact, 0, dtype)(a, b, r1, r2)
    assert torch.equal(a, x1q) and torch.equal(b, x2q)
    assert top != (checksum(x1q), checksum(x2q))


@torch.no_grad()
def test_exact_forward_matches_float_forward_in_fp64():
    """The fixed-point forward is the float coupling up to ~2^-33 rounding per step."""
    exact, flt = FixedPointStreams(), FloatStreams()
    cs, x1, x2 = _chain(torch.float64, 3, 3, depth=8)
    a, b = quantize(x1, exact.frac_bits), quantize(x2, exact.frac_bits)
    fa, fb = x1, x2
    for c in cs:
        a, b, _, _ = c.program("forward", exact, 0, torch.float64)(a, b, None)
        fa, fb, _, _ = c.program("forward", flt, 0)(fa, fb, None)
    err = max((dequantize(a, exact.frac_bits, torch.float64) - fa).abs().max().item(),
              (dequantize(b, exact.frac_bits, torch.float64) - fb).abs().max().item())
    assert err < 1e-8


@torch.no_grad()
def test_float_inverse_error_explodes_with_depth():
    """Why exact numerics exist: in fp32 with λ = β = 2^-3 the float programs' inverse diverges
    (measured on these MLPs: depth 1: 3.5e-6, 4: 0.41, 48: inf/nan) where exact is bit-exact."""
    flt = FloatStreams()

    def roundtrip_error(depth):
        cs, x1, x2 = _chain(torch.float32, 3, 3, depth=depth)
        a, b = x1, x2
        for c in cs:
            a, b, _, _ = c.program("forward", flt, 0)(a, b, None)
        for c in reversed(cs):
            a, b = c.program("inverse", flt, 0)(a, b, None, None)
        err = torch.cat([(a.double() - x1.double()).reshape(-1), (b.double() - x2.double()).reshape(-1)])
        return math.inf if not bool(torch.isfinite(err).all()) else err.abs().max().item()

    errs = {d: roundtrip_error(d) for d in (1, 4, DEPTH)}
    assert errs[1] < 1e-4 and errs[4] > errs[1] and errs[DEPTH] > 1e-3


def test_exact_programs_name_what_is_wrong():
    exact = FixedPointStreams()
    g = torch.Generator().manual_seed(5)
    x1q, x2q = (quantize(torch.randn(4, 8, generator=g), DEFAULT_FRAC_BITS) for _ in range(2))
    ident = _Fn(lambda t: t)

    def forward(F, G, a=x1q, b=x2q, lam=2.0 ** -3):
        return Coupling(F, G, lam, 2.0 ** -3, False).program("forward", exact, 0, torch.float32)(a, b, None)

    with pytest.raises(ValueError, match="shape"):
        forward(_Fn(lambda t: t[:, :4]), ident)
    with pytest.raises(ValueError, match="not finite"):
        forward(ident, _Fn(lambda t: t / 0.0))
    with pytest.raises(ValueError, match="int64"):
        forward(ident, ident, a=x1q.float())
    with pytest.raises(FixedPointOverflow, match=r"y1 = λ·x1 \+ F\(x2\) overflows int64.*frac_bits"):
        forward(_Fn(lambda t: torch.full_like(t, 2.0 ** 30)), ident, a=torch.full((4, 8), INT64_MAX - 5), lam=1.0)
    with pytest.raises(ValueError, match="power of two"):
        exact.check_scale(0.1, "λ")


def test_programs_read_like_the_equations():
    """The printed exact programs show each step: dequantize, F, quantize, shift, checked add."""
    c = Coupling(_Fn(lambda t: t), _Fn(lambda t: t), 2.0 ** -4, 1.0, True)
    exact = FixedPointStreams()
    fwd = c.program("forward", exact, 0, torch.float32).code
    for step in ("dequantize", "self.F(f_in)", "quantize", "shift_down", "add_checked", "'y1 = λ·x1 + F(x2)'",
                 "record_rng(tape, 'F')", "return (y2, y1, r1, None)"):
        assert step in fwd, step
    bwd = c.program("backward", exact, 0, torch.float32).code
    for step in ("replay_vjp(tape, 'G'", "grad_into = dy1", "replay_vjp(tape, 'F'", "input_grad = input_grads",
                 "shift_up",
                 "coupling_input_grads(input_grads, dy1_total, dy2, d_f_in, 0.0625, 1.0)"):
        assert step in bwd, step
    assert fwd.startswith("\n\n\n# made by pass codegen") or "# made by pass codegen" in fwd.splitlines()[3]
