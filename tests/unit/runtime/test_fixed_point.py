"""Tests for meft_fx.runtime.fixed_point: the integer primitives of the exact reversible coupling."""
from __future__ import annotations

import math

import pytest
import torch

from meft_fx.runtime.fixed_point import (
    DEFAULT_FRAC_BITS,
    MAX_FRAC_BITS,
    FixedPointOverflow,
    add_checked,
    checksum,
    dequantize,
    pack_bits,
    quantize,
    shift_down,
    shift_up,
    shift_up_unchecked,
    sub_shifted,
    unpack_bits,
)

INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1
DEPTH = 48


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster and keeps the shared machine free."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_int64(shape, seed: int = 0) -> torch.Tensor:
    """int64 values spread over all magnitudes (2^0 .. 2^63), both signs, plus the extremes."""
    g = _gen(seed)
    n = math.prod(shape)
    mags = torch.randint(0, 63, (n,), generator=g)
    lo = torch.randint(0, 2 ** 62, (n,), generator=g)
    vals = lo >> (62 - mags).clamp(min=0)               # |v| < 2^mags
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    vals = vals * sign
    extremes = torch.tensor([INT64_MIN, INT64_MAX, -1, 0, 1, INT64_MIN + 1, -2, 2 ** 62, -(2 ** 62)])
    vals[: min(n, extremes.numel())] = extremes[: min(n, extremes.numel())]
    return vals.view(shape)


# ---------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("frac_bits", [0, 8, 16, 32, 40])
def test_quantize_roundtrip_error_fp64(frac_bits):
    g = _gen(1)
    x = torch.randn(1000, generator=g, dtype=torch.float64) * torch.logspace(-6, 6, 1000, dtype=torch.float64)
    q = quantize(x, frac_bits)
    assert q.dtype == torch.int64 and q.shape == x.shape
    back = dequantize(q, frac_bits, torch.float64)
    assert back.dtype == torch.float64
    # Round to nearest: error ≤ half a unit; the requirement is ≤ one unit (2^-frac_bits).
    err = (back - x).abs().max().item()
    assert err <= 2.0 ** -(frac_bits + 1)


@pytest.mark.parametrize("frac_bits", [0, 13, 32, 50])
def test_quantize_exact_for_representable_values(frac_bits):
    g = _gen(2)
    q = torch.randint(-(2 ** 52), 2 ** 52, (500,), generator=g)
    x = q.to(torch.float64) * 2.0 ** -frac_bits              # exactly representable
    assert torch.equal(quantize(x, frac_bits), q)
    assert torch.equal(dequantize(q, frac_bits, torch.float64), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_quantize_low_precision_dtypes_exact_at_default_bits(dtype):
    # Every fp32/bf16/fp16 value with 2^-9 <= |x| < 2^20 is a multiple of 2^-32: exact round trip.
    g = _gen(3)
    x = (torch.randn(2000, generator=g) * 8).to(dtype)
    x = x[(x.abs() >= 2 ** -9)]
    q = quantize(x, DEFAULT_FRAC_BITS)
    back = dequantize(q, DEFAULT_FRAC_BITS, dtype)
    assert back.dtype == dtype
    assert torch.equal(back, x)


def test_quantize_rounds_to_nearest():
    x = torch.tensor([0.2, 0.3, -0.2, -0.3, 0.7, -0.7, 1.0, -1.0], dtype=torch.float64)
    assert quantize(x, 0).tolist() == [0, 0, 0, 0, 1, -1, 1, -1]
    assert quantize(torch.tensor([0.74, 0.76]), 1).tolist() == [1, 2]   # 1.48 -> 1, 1.52 -> 2


def test_default_frac_bits_headroom_and_resolution():
    # Activations up to ~1e6 fit with at least 1000x headroom in int64 ...
    assert 1e6 * 1000 < 2.0 ** (63 - DEFAULT_FRAC_BITS)
    q = quantize(torch.tensor([1e6, -1e6, 123456.789]), DEFAULT_FRAC_BITS)
    assert torch.equal(dequantize(q, DEFAULT_FRAC_BITS, torch.float32), torch.tensor([1e6, -1e6, 123456.789]))
    # ... and the resolution is finer than the fp32 and bf16 ulp at scale ~1.
    assert 2.0 ** -DEFAULT_FRAC_BITS < torch.finfo(torch.float32).eps / 100
    assert 2.0 ** -DEFAULT_FRAC_BITS < torch.finfo(torch.bfloat16).eps / 100


def test_quantize_rejects_non_finite_with_count():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
    with pytest.raises(ValueError, match=r"3 of 5 values are not finite"):
        quantize(x, 16)


def test_quantize_rejects_overflow():
    with pytest.raises(ValueError, match="overflow"):
        quantize(torch.tensor([1.0, 2.0 ** 31]), 32)
    with pytest.raises(ValueError, match="overflow"):
        quantize(torch.tensor([3.0e38], dtype=torch.float32), 0)
    # just inside the range is fine (-2^63 is representable, 2^63 is not)
    assert quantize(torch.tensor([-(2.0 ** 31)], dtype=torch.float64), 32).item() == INT64_MIN


@pytest.mark.parametrize("bad", [-1, MAX_FRAC_BITS + 1, 64, 1.5, True, "8", None])
def test_bad_frac_bits(bad):
    with pytest.raises(ValueError, match="frac_bits"):
        quantize(torch.zeros(3), bad)
    with pytest.raises(ValueError, match="frac_bits"):
        dequantize(torch.zeros(3, dtype=torch.int64), bad, torch.float32)


def test_bad_tensor_types():
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.zeros(3, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="int64"):
        dequantize(torch.zeros(3), 8, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        dequantize(torch.zeros(3, dtype=torch.int64), 8, torch.int32)


# ------------------------------------------------------------------------------ shifts
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("k", [0, 1, 3, 7, 8, 9, 13])
def test_shift_roundtrip_bit_exact(k, packed):
    q = _random_int64((7, 33, 5), seed=k)                    # odd numel (1155)
    s, rem = shift_down(q, k, packed=packed)
    assert s.dtype == torch.int64 and s.shape == q.shape
    assert torch.equal(s, torch.div(q, 2 ** k, rounding_mode="floor"))   # arithmetic = floor
    if k == 0:
        assert s is q
        assert rem.dtype == torch.uint8 and rem.numel() == 0
    elif packed:
        assert rem.dtype == torch.uint8 and rem.dim() == 1
        assert rem.numel() == math.ceil(q.numel() * k / 8)
    else:
        assert rem.shape == q.shape
        assert rem.dtype == (torch.uint8 if k <= 8 else torch.int16)
        assert torch.equal(rem.to(torch.int64), q - s * 2 ** k)
    back = shift_up(s, rem, k, packed=packed)
    assert back.dtype == torch.int64
    assert torch.equal(back, q)


@pytest.mark.parametrize("packed", [True, False])
def test_shift_large_k_and_small_shapes(packed):
    for k in (16, 31, 40, 62):
        for shape in ((), (1,), (3,), (2, 9)):
            q = _random_int64(shape if shape else (1,), seed=k).reshape(shape)
            s, rem = shift_down(q, k, packed=packed)
            assert torch.equal(shift_up(s, rem, k, packed=packed), q)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("k", [3, 9])
def test_shift_non_contiguous_and_empty(k, packed):
    q = _random_int64((6, 10), seed=11).t()                  # non-contiguous view
    s, rem = shift_down(q, k, packed=packed)
    assert torch.equal(shift_up(s, rem, k, packed=packed), q)
    e = torch.empty(0, 4, dtype=torch.int64)
    s, rem = shift_down(e, k, packed=packed)
    assert shift_up(s, rem, k, packed=packed).shape == (0, 4)


def test_shift_errors():
    q = _random_int64((10,))
    with pytest.raises(ValueError, match="k"):
        shift_down(q, -1)
    with pytest.raises(ValueError, match="k"):
        shift_up(q, torch.empty(0, dtype=torch.uint8), -3)
    with pytest.raises(ValueError, match="int64 or torch.int32"):
        shift_down(q.to(torch.int16), 3)
    s, rem = shift_down(q, 3)
    with pytest.raises(ValueError, match="bytes"):
        shift_up(s, rem[:-1], 3)
    with pytest.raises(ValueError, match="packed"):
        shift_up(s, rem, 3, packed=False)                     # packed remainder, unpacked flag
    s, rem = shift_down(q, 3, packed=False)
    with pytest.raises(ValueError, match="packed"):
        shift_up(s, rem, 3, packed=True)
    with pytest.raises(ValueError, match=r"\[0, 2\^3\)"):
        shift_up(s, rem + 8, 3, packed=False)
    with pytest.raises(RuntimeError, match="overflow"):
        shift_up(torch.tensor([2 ** 61]), torch.zeros(1, dtype=torch.uint8), 3, packed=False)


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("k", list(range(1, 17)))
def test_pack_unpack_roundtrip(k):
    g = _gen(k)
    for shape in ((0,), (1,), (7,), (9,), (13,), (3, 5, 7), (1001,), (8, 64)):
        v = torch.randint(0, 2 ** k, shape, generator=g)
        packed = pack_bits(v, k)
        n = v.numel()
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == (n * k + 7) // 8
        out = unpack_bits(packed, k, n)
        assert out.dtype == torch.int64 and out.shape == (n,)
        assert torch.equal(out, v.reshape(-1))


@pytest.mark.parametrize("k", [1, 3, 8, 12, 24, 40, 62])
def test_pack_extreme_values_and_dtypes(k):
    top = 2 ** k - 1
    v = torch.tensor([0, top, 1, top - 1, top, 0, top // 2, 1, top, top, 0], dtype=torch.int64)
    assert torch.equal(unpack_bits(pack_bits(v, k), k, v.numel()), v)
    if k <= 7:
        assert torch.equal(unpack_bits(pack_bits(v.to(torch.uint8), k), k, v.numel()), v)
    if k <= 15:
        assert torch.equal(unpack_bits(pack_bits(v.to(torch.int16), k), k, v.numel()), v)


def test_pack_is_dense():
    # k bits per element, not a byte: 8 values of 3 bits take exactly 3 bytes.
    assert pack_bits(torch.full((8,), 7), 3).tolist() == [255, 255, 255]
    assert pack_bits(torch.ones(16, dtype=torch.int64), 1).numel() == 2


def test_pack_errors():
    with pytest.raises(ValueError, match=r"\[0, 2\^3\)"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\^3\)"):
        pack_bits(torch.tensor([-1, 2]), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="k"):
        pack_bits(torch.tensor([0, 1]), -1)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 9)   # needs 4 bytes
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int64), 3, 9)
    with pytest.raises(ValueError, match="k"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), -2, 9)
    assert pack_bits(torch.zeros(5, dtype=torch.int64), 0).numel() == 0


@pytest.mark.parametrize("k", [1, 3, 4, 8, 9, 17, 40])
def test_unchecked_shift_up_restores_what_shift_down_dropped(k):
    q = _random_int64((3, 7, 5), seed=k) >> 1
    shifted, rem = shift_down(q, k)
    assert torch.equal(shift_up_unchecked(shifted, rem, k), q)
    assert torch.equal(shift_up_unchecked(shifted, rem, k), shift_up(shifted, rem, k))
    assert shift_up_unchecked(q, shift_down(q, 0)[1], 0) is q


# ---------------------------------------------------------------------------- checksum
def test_checksum_equal_for_equal_tensors():
    q = _random_int64((6, 7, 8))
    c = checksum(q)
    assert isinstance(c, int) and 0 <= c < 2 ** 64
    assert checksum(q.clone()) == c
    assert checksum(q.transpose(0, 2).contiguous().transpose(0, 2)) == c   # same values, other layout
    assert checksum(torch.empty(0, dtype=torch.int64)) == checksum(torch.empty(0, dtype=torch.int64))


def test_checksum_detects_single_element_change():
    q = _random_int64((5, 9, 11), seed=4)
    c = checksum(q)
    flat = q.reshape(-1)
    for pos in (0, 1, 17, flat.numel() // 2, flat.numel() - 1):
        for delta in (1, -1, 2, 2 ** 31, -(2 ** 40), 2 ** 62, INT64_MIN):   # INT64_MIN: flips the sign bit
            changed = flat.clone()
            changed[pos] = changed[pos] + delta                                # int64 wraparound
            assert checksum(changed.view(q.shape)) != c, (pos, delta)


def test_checksum_detects_swaps_and_shape():
    q = torch.arange(-50, 50, dtype=torch.int64) * 3
    c = checksum(q)
    for i, j in ((0, 1), (10, 11), (0, 99), (5, 70), (49, 50)):
        swapped = q.clone()
        swapped[i], swapped[j] = q[j], q[i]
        assert checksum(swapped) != c, (i, j)
    assert checksum(q.view(10, 10)) != c
    assert checksum(q.flip(0)) != c


def test_checksum_rejects_non_int64():
    with pytest.raises(ValueError, match="int64"):
        checksum(torch.zeros(3))


def test_checked_add_raises_exactly_on_overflow():
    hi, lo = INT64_MAX, -INT64_MAX - 1
    small = torch.tensor([1, -3, 7])
    assert torch.equal(add_checked(small, small, "s"), 2 * small)  # bounds far from the limits
    # the bounds could overflow (max + max > 2^63 − 1) but no element pair does: no error
    a, b = torch.tensor([hi, -5]), torch.tensor([-5, hi])
    assert torch.equal(add_checked(a, b, "s"), torch.tensor([hi - 5, hi - 5]))
    assert torch.equal(add_checked(torch.tensor([hi - 1]), torch.tensor([1]), "s"), torch.tensor([hi]))
    assert torch.equal(add_checked(torch.tensor([lo + 1]), torch.tensor([-1]), "s"), torch.tensor([lo]))
    for x, y in [([hi, 0], [1, 0]), ([0, lo], [0, -1]), ([hi // 2 + 1], [hi // 2 + 1])]:
        with pytest.raises(FixedPointOverflow, match="what overflows int64"):
            add_checked(torch.tensor(x), torch.tensor(y), "what")


def test_checked_add_refuses_a_broadcast():
    with pytest.raises(ValueError, match="shape"):
        add_checked(torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 1, dtype=torch.int64), "y1")


def test_sub_shifted_subtracts_the_shifted_source_and_checks_overflow():
    from meft_fx.runtime.fixed_point import sub_shifted, sub_shifted_unchecked

    q, src = torch.tensor([100, -7, 5]), torch.tensor([-33, 64, 7])
    assert torch.equal(sub_shifted(q, src, 2, "y"), q - (src >> 2)) and torch.equal(sub_shifted(q, src, 0, "y"), q - src)
    assert torch.equal(sub_shifted_unchecked(q, src, 2), q - (src >> 2))
    lo, hi = -(2 ** 63), 2 ** 63 - 1
    with pytest.raises(FixedPointOverflow, match="y1 = λ·"):
        sub_shifted(torch.tensor([lo]), torch.tensor([1]), 0, "y1 = λ·(x1 − x2) + F(x2)")
    with pytest.raises(FixedPointOverflow):
        sub_shifted(torch.tensor([hi]), torch.tensor([-4]), 1, "y")
    assert torch.equal(sub_shifted(torch.tensor([hi - 2]), torch.tensor([-4]), 1, "y"), torch.tensor([hi]))
    with pytest.raises(ValueError, match="shape"):
        sub_shifted(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), 1, "y")


def test_int32_streams_use_int32_limits_everywhere():
    """quantize, the checked sums and shift_up test int32's range for int32 streams; shifts and checksums work."""
    x = torch.tensor([1.5, -2.25, 32767.0])
    q = quantize(x, 16, torch.int32)
    assert q.dtype == torch.int32 and q.tolist() == [3 << 15, -(9 << 14), 32767 << 16]
    assert torch.equal(dequantize(q, 16, torch.float32), x)
    with pytest.raises(ValueError, match=r"overflow int32 with frac_bits=16.*stream_bits=64"):
        quantize(torch.tensor([32768.0]), 16, torch.int32)
    s, rem = shift_down(q, 5)
    assert s.dtype == torch.int32 and torch.equal(shift_up(s, rem, 5), q)
    big = torch.tensor([2 ** 30], dtype=torch.int32)
    with pytest.raises(FixedPointOverflow, match="int32"):
        add_checked(big, big)
    with pytest.raises(FixedPointOverflow, match="int32"):
        sub_shifted(-big - 2, big, 0)
    with pytest.raises(FixedPointOverflow, match="int32"):
        shift_up(big, torch.zeros(1, dtype=torch.uint8), 3, packed=False)
    assert add_checked(big, -big).dtype == torch.int32
    assert checksum(q) != checksum(q.flip(0)) and checksum(q) == checksum(q.clone())
