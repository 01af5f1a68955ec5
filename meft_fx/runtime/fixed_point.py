"""Fixed-point primitives for the exact (bit-reversible) coupling.

A MEFT coupling is

    y1 = λ·x1 + F(x2)
    y2 = β·x2 + G(y1)          with λ = 2^-k1, β = 2^-k2  (k = 0: no scaling)

In float arithmetic its inverse divides by λ and β, which amplifies rounding error by
2^k per layer and compounds with depth (DESIGN.md §2).  Here the two streams are instead kept
in **fixed point**: int64 tensors ``q`` with ``frac_bits`` fractional bits, standing for the
value ``q · 2^-frac_bits``.

* F and G are evaluated in the model's float dtype on the *dequantized* stream, and their
  outputs are quantized (round to nearest) back to int64.  F and G must be deterministic: the
  inverse evaluates them again on exactly the same input bits and needs exactly the same
  output bits.
* Multiplying a stream by 2^-k is an arithmetic right shift, which drops the k low bits; those
  bits are returned (packed, k bits per element) so that the inverse can put them back.
* Integer addition and subtraction lose nothing (int64 add/sub is exact, and even a
  wraparound would be undone by the matching subtraction).

Hence the inverse of a coupling built from these pieces (``meft_fx.runtime.arithmetic``
emits them into the generated programs) reproduces its inputs bit for bit, at any depth and in
any dtype, at a memory cost of k1 + k2 bits per element per coupling.

Nothing in this module depends on the rest of the package; everything is a pure function of
tensors.  Autograd is the caller's business: quantization is not differentiable (the runtime
treats it as identity, straight-through), so these functions are normally called under
``torch.no_grad()``.
"""
from __future__ import annotations

import operator
import torch

__all__ = [
    "DEFAULT_FRAC_BITS",
    "MAX_FRAC_BITS",
    "MAX_SHIFT",
    "STREAM_DTYPES",
    "width",
    "quantize",
    "quantize_unchecked",
    "dequantize",
    "dequantize_unchecked",
    "shift_down",
    "shift_up",
    "shift_up_unchecked",
    "pack_bits",
    "unpack_bits",
    "checksum",
    "add_checked",
    "sub_shifted",
    "sub_shifted_unchecked",
    "FixedPointOverflow",
    "OVERFLOW_ADVICE",
]

#: Default number of fractional bits of the fixed-point streams (value = q · 2^-32).
#:
#: Why 32:
#:
#: * **Range.**  int64 holds |q| < 2^63, so values up to 2^31 ≈ 2.1e9 in magnitude: about
#:   2000× headroom over the ~1e6 that transformer activations (including outlier features)
#:   can reach, and room for ``λ·x1 + F(x2)`` to add two such values without overflow.
#: * **Resolution.**  2^-32 ≈ 2.3e-10.  That is finer than the fp32 ulp for every |x| ≥ 2^-9
#:   (≈ 0.002) and finer than the bf16/fp16 ulp for any normal value at activation scales, so
#:   at typical scales (~1, fp32 ulp 1.2e-7) quantizing F's output loses nothing visible —
#:   the stream is as accurate as the float computation it replaces.
#: * **Exact dequantization.**  q converts to float64 exactly while |q| < 2^53, i.e. for
#:   |value| < 2^21 ≈ 2.1e6, so dequantize is exact over the whole activation range.
#:
#: Exactness of the *inverse* does not depend on this choice at all (any frac_bits gives a
#: bit-exact reconstruction); it only sets how close the fixed-point forward is to float.
DEFAULT_FRAC_BITS: int = 32

#: Largest accepted ``frac_bits``.  int64 has 63 magnitude bits; at 62 fractional bits only
#: |value| < 2 is representable, so larger values make no sense.
MAX_FRAC_BITS: int = 62

#: The integer dtypes a stream may have, by width: int64 (the default) or int32 (half the memory; its range
#: ±2^(31 − frac_bits) must hold the stream: `MEFTConfig(stream_bits=32)`).
STREAM_DTYPES = {64: torch.int64, 32: torch.int32}

#: Largest accepted shift ``k`` (λ = 2^-k).  Realistic values are 0..16.
MAX_SHIFT: int = 62

_TWO63 = float(2 ** 63)

#: What to do when a stream leaves the fixed-point range (said by every overflow error).
OVERFLOW_ADVICE = ("values beyond ±2^(63 − frac_bits) (int32 streams: ±2^(31 − frac_bits)) do not fit: convert "
                   "with a smaller MEFTConfig(frac_bits=...), e.g. 24 (int32: 12), with MEFTConfig(stream_bits=64) "
                   "if the streams are int32, or numerics='float'")


class FixedPointOverflow(RuntimeError):
    """An int64 fixed-point stream left the representable range."""


# ----------------------------------------------------------------------------------- checks
def _as_int(value, name: str, lo: int, hi: int) -> int:
    """Return ``value`` as a Python int in [lo, hi], else raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], "
                         f"got {type(value).__name__} {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _check_frac_bits(frac_bits) -> int:
    return _as_int(frac_bits, "frac_bits", 0, MAX_FRAC_BITS)


def _check_k(k, name: str = "k") -> int:
    return _as_int(k, name, 0, MAX_SHIFT)


def _check_stream(q, name: str) -> None:
    """`q` is a fixed-point stream: an int64 or int32 tensor (`STREAM_DTYPES`)."""
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of dtype int64 or int32, got {type(q).__name__}")
    _stream_dtype(q.dtype, f"{name} must have dtype torch.int64 or torch.int32 (a fixed-point stream), got {q.dtype}")


def width(q: torch.Tensor) -> int:
    """The bit width of a fixed-point stream's integers (64 or 32)."""
    return 8 * q.element_size()


def _stream_dtype(dtype, message: str | None = None) -> torch.dtype:
    """`dtype` if it is one of `STREAM_DTYPES`, else ValueError(`message`)."""
    if dtype not in STREAM_DTYPES.values():
        raise ValueError(message or f"a fixed-point stream's dtype must be torch.int64 or torch.int32, got {dtype!r}")
    return dtype


# ------------------------------------------------------------------------ quantize / dequantize
def quantize(x: torch.Tensor, frac_bits: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Convert a float tensor to fixed point in `dtype` (int64, or int32): ``round(x · 2^frac_bits)``.

    Accepts any floating dtype (float64, float32, bfloat16, float16).  The computation is
    done in fp32 (float64 for float64 input), where scaling by a power of two is exact
    (bf16/fp16 values widen to fp32 exactly), followed by round to nearest (ties to even):
    the result is the fixed-point value nearest to ``x``, off by at most 2^-(frac_bits+1) —
    the same integers a float64 computation gives.

    Raises:
        ValueError: ``x`` is not a floating tensor; ``frac_bits`` is not in
            [0, MAX_FRAC_BITS]; ``x`` contains NaN or ±inf (the count is reported); or a
            value does not fit in `dtype` after scaling (|x| ≥ 2^(63 - frac_bits), int32: 2^(31 - frac_bits)).
    """
    frac_bits = _check_frac_bits(frac_bits)
    dtype = _stream_dtype(dtype)
    bits = 8 * dtype.itemsize
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor, got dtype {x.dtype} "
                         "(is it already quantized?)")
    # Scale in fp32 (float64 stays float64; bf16/fp16 are widened to fp32 first, exactly): multiplying
    # by 2^frac_bits is exact there too, and rounding a float to the nearest integer gives that same
    # integer in any binary format that holds the value, so the result equals the float64 computation.
    work = x.detach()
    if work.dtype != torch.float64:
        work = work.to(torch.float32)
    limit = 2.0 ** (bits - 1 - frac_bits)
    if torch.compiler.is_compiling():  # torch.export: the same check as an op of the exported program
        torch._assert_async((work.abs() < limit).all(), f"quantize: values are NaN, infinite or overflow int{bits} "
                            f"with frac_bits={frac_bits} (|x| < {limit:.6g} needed)")
        return quantize_unchecked(work, frac_bits, dtype)
    lo, hi = (float(v) for v in torch.aminmax(work)) if work.numel() else (0.0, 0.0)  # NaN propagates
    if not (-limit <= lo and hi < limit):  # int64 holds [-2^63, 2^63), int32 [-2^31, 2^31)
        worst = max(abs(lo), abs(hi))
        finite = torch.isfinite(work)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"quantize: {bad} of {work.numel()} values are not finite (NaN or inf); "
                             "fixed point cannot represent them (did F or G overflow in "
                             f"{x.dtype}?)")
        n_over = int(((work >= limit) | (work < -limit)).sum())
        raise ValueError(f"quantize: {n_over} values overflow int{bits} with frac_bits={frac_bits} "
                         f"(max |x| = {worst:.6g}, representable |x| < {limit:.6g}); "
                         f"{OVERFLOW_ADVICE}")
    return quantize_unchecked(work, frac_bits, dtype)


def quantize_unchecked(x: torch.Tensor, frac_bits: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """`quantize` without its checks (for inference programs that check their output instead):
    the same integers for finite values in range; NaN, inf and values out of range give unspecified integers
    (int64: its minimum, a value no stream of real activations reaches)."""
    work = x.detach() if x.dtype == torch.float64 else x.detach().to(torch.float32)
    return (work * (2.0 ** frac_bits)).round_().to(dtype)  # power-of-two scaling: exact; round: ties to even


def dequantize(q: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Convert a fixed-point tensor (int64 or int32) to floats of ``dtype``: ``q · 2^-frac_bits``.

    Rounds q once to fp32 (float64 for a float64 ``dtype``), scales exactly by 2^-frac_bits,
    then casts to ``dtype``: for |q| < 2^53 the same result as computing in float64 and
    rounding to ``dtype``.

    Raises:
        ValueError: ``q`` is not int64 or int32, ``frac_bits`` out of range, or ``dtype`` is not a
            floating dtype.
    """
    frac_bits = _check_frac_bits(frac_bits)
    _check_stream(q, "q")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dequantize: dtype must be a floating torch.dtype, got {dtype!r}")
    return dequantize_unchecked(q, frac_bits, dtype)


def dequantize_unchecked(q: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize` without validating its arguments (inference programs, once per token and half)."""
    # One rounding of q to the working float (fp32 for fp32 and narrower targets), then an exact
    # power-of-two scaling: the same value as q · 2^-frac_bits computed in float64 and rounded to
    # fp32 whenever |q| < 2^53 (always, for streams of real activations).
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = q.to(work)
    out.mul_(2.0 ** -frac_bits)
    return out if dtype == work else out.to(dtype)


# ------------------------------------------------------------------------------- bit packing
def _unpacked_dtype(k: int) -> torch.dtype:
    """Smallest dtype that stores a k-bit unsigned value per element."""
    if k <= 8:
        return torch.uint8
    if k <= 15:
        return torch.int16
    if k <= 31:
        return torch.int32
    return torch.int64


def _packed_nbytes(numel: int, k: int) -> int:
    return (numel * k + 7) // 8


def _pack_rows(v8: torch.Tensor, r: int) -> torch.Tensor:
    """Pack an (8, m) uint8 tensor of r-bit values (1 ≤ r ≤ 7) into (r, m) uint8.

    Column c holds 8 values v8[0, c] .. v8[7, c]; they form the 8r-bit word
    ``sum_j v8[j, c] << (j·r)``, whose byte i is stored in out[i, c].  All operations are on
    contiguous rows, which is what makes this fast.
    """
    m = v8.shape[1]
    if 8 % r == 0:  # whole values per byte: byte i holds values i·(8/r) .. i·(8/r) + 8/r − 1
        v = v8.view(r, 8 // r, m)
        out = v[:, 0].clone()
        for t in range(1, 8 // r):
            out |= v[:, t] << (t * r)
        return out
    out = torch.zeros((r, m), dtype=torch.uint8, device=v8.device)
    for j in range(8):
        i, off = divmod(j * r, 8)
        row = v8[j]
        out[i] |= (row << off) if off else row        # uint8 shift drops the spilled bits...
        if off + r > 8:
            out[i + 1] |= row >> (8 - off)            # ...which go to the next byte
    return out


def _unpack_rows(b: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: (r, m) uint8 -> (8, m) uint8."""
    m = b.shape[1]
    vals = torch.empty((8, m), dtype=torch.uint8, device=b.device)
    mask = (1 << r) - 1
    if 8 % r == 0:
        v = vals.view(r, 8 // r, m)
        for t in range(8 // r):
            torch.bitwise_and(b >> (t * r) if t else b, mask, out=v[:, t])
        return vals
    for j in range(8):
        i, off = divmod(j * r, 8)
        x = (b[i] >> off) if off else b[i]
        if off + r > 8:
            x = x | (b[i + 1] << (8 - off))
        vals[j] = (x & mask) if off + r != 8 else x
    return vals


def _pack_unchecked(v: torch.Tensor, k: int) -> torch.Tensor:
    """Pack flat integer values (int64; uint8 for k ≤ 8) in [0, 2^k), 1 ≤ k ≤ MAX_SHIFT, into ceil(n·k/8) bytes.

    No validation.  Layout, with k = 8·a + r (0 ≤ r < 8), n = 8·m + t (0 ≤ t < 8):

    * the r low bits of every value (only if r > 0):
      - r·m bytes for the first 8·m values, viewed as an (8, m) array (row j = values
        j·m .. j·m + m - 1): column c's eight values make the 8r-bit little-endian word
        whose byte i is byte i·m + c;
      - ceil(t·r/8) bytes for the t last values: a little-endian bit stream (value s in
        bits [s·r, (s+1)·r));
    * then, for each of the a remaining whole bytes (least significant first), n bytes:
      byte i of value s at offset i·n + s.

    Total: r·m + ceil(t·r/8) + a·n = ceil(n·k/8) bytes, the minimum.
    """
    n = v.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=v.device)
    a, r = divmod(k, 8)
    m, t = divmod(n, 8)
    parts = []
    if r:
        low = (v & ((1 << r) - 1)) if a else v
        low8 = low.to(torch.uint8)
        if m:
            parts.append(_pack_rows(low8[: 8 * m].view(8, m), r).view(-1))
        if t:
            tail = torch.cat([low8[8 * m:], low8.new_zeros(8 - t)]).view(8, 1)
            parts.append(_pack_rows(tail, r).view(-1)[: _packed_nbytes(t, r)])
    if a:
        hi = torch.empty((a, n), dtype=torch.uint8, device=v.device)
        for i in range(a):
            hi[i] = (v >> (r + 8 * i)) & 0xFF
        parts.append(hi.view(-1))
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts)


def _unpack_unchecked(packed: torch.Tensor, k: int, numel: int, small: bool = False) -> torch.Tensor:
    """Inverse of :func:`_pack_unchecked` (no validation); returns flat int64 (`small`: uint8 when k < 8)."""
    n = numel
    if n == 0:
        return torch.empty(0, dtype=torch.uint8 if small and k < 8 else torch.int64, device=packed.device)
    a, r = divmod(k, 8)
    m, t = divmod(n, 8)
    n_low = _packed_nbytes(n, r)
    v = None
    if r:
        pieces = []
        if m:
            pieces.append(_unpack_rows(packed[: r * m].view(r, m), r).view(-1))
        if t:
            tb = packed[r * m: n_low]
            tb = torch.cat([tb, tb.new_zeros(r - tb.numel())]).view(r, 1)
            pieces.append(_unpack_rows(tb, r).view(-1)[:t])
        v = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if small and not a:
            return v
        v = v.to(torch.int64)
    if a:
        hi = packed[n_low:].view(a, n)
        for i in range(a):
            term = hi[i].to(torch.int64) << (r + 8 * i)
            v = term if v is None else (v | term)
    return v


def pack_bits(values: torch.Tensor, k: int) -> torch.Tensor:
    """Pack integers in [0, 2^k) into a flat uint8 tensor of ceil(numel·k/8) bytes.

    ``values`` may have any shape and any integer dtype; it is read in row-major order.
    ``k = 0`` gives an empty tensor.  See :func:`unpack_bits` for the inverse.  The byte
    layout (documented in ``_pack_unchecked``) is chosen so that packing works on
    contiguous rows only: groups of 8 values spaced numel/8 apart share k bytes.

    Raises:
        ValueError: ``k`` not in [0, MAX_SHIFT], ``values`` not an integer tensor, or a
            value outside [0, 2^k).
    """
    k = _check_k(k)
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"pack_bits expects a torch.Tensor, got {type(values).__name__}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"pack_bits expects an integer tensor, got dtype {values.dtype}")
    v = values.reshape(-1).to(torch.int64)
    if k == 0:
        if v.numel() and bool((v != 0).any()):
            raise ValueError("pack_bits with k=0: all values must be 0")
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    if v.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    lo, hi = (int(t) for t in torch.aminmax(v))
    if lo < 0 or hi >= (1 << k):
        raise ValueError(f"pack_bits: values must lie in [0, 2^{k}) = [0, {1 << k}), "
                         f"got range [{lo}, {hi}]")
    return _pack_unchecked(v, k)


def unpack_bits(packed: torch.Tensor, k: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: return the ``numel`` values as a flat int64 tensor.

    Raises:
        ValueError: ``k`` out of range, ``numel`` negative, ``packed`` not a 1-D uint8
            tensor, or its length is not ceil(numel·k/8).
    """
    k = _check_k(k)
    numel = _as_int(numel, "numel", 0, 2 ** 62)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        desc = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) \
            else type(packed).__name__
        raise ValueError(f"unpack_bits expects a 1-D uint8 tensor, got {desc}")
    expected = _packed_nbytes(numel, k)
    if packed.numel() != expected:
        raise ValueError(f"unpack_bits: {numel} values of {k} bits need {expected} bytes, "
                         f"got {packed.numel()}")
    if k == 0 or numel == 0:
        return torch.zeros(numel, dtype=torch.int64, device=packed.device)
    return _unpack_unchecked(packed.contiguous(), k, numel)


# ------------------------------------------------------------------------------------ shifts
def shift_down(q: torch.Tensor, k: int, *, packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiply an int64 fixed-point tensor by 2^-k exactly, keeping the dropped bits.

    Returns ``(q >> k, remainder)`` where ``q >> k`` is the arithmetic (floor) shift and the
    remainder holds the k low bits of each element (in [0, 2^k), two's complement, so
    negatives work): ``(q >> k) · 2^k + remainder == q``.

    With ``packed=True`` (default) the remainder is a flat uint8 tensor of ceil(numel·k/8)
    bytes (:func:`pack_bits`), the information-theoretic minimum.  With ``packed=False`` it
    has ``q``'s shape and the smallest dtype holding k bits (uint8 for k ≤ 8, then int16,
    int32, int64).  ``k = 0`` returns ``(q, empty uint8 tensor)`` (``q`` itself, not a copy).

    Raises:
        ValueError: ``q`` not int64 or ``k`` not in [0, MAX_SHIFT].
    """
    k = _check_k(k)
    _check_stream(q, "q")
    if k == 0:
        return q, torch.empty(0, dtype=torch.uint8, device=q.device)
    shifted = q >> k
    if k <= 8:  # the low byte (int64 -> uint8 keeps the 8 low bits, two's complement), then its k low bits
        rem = q.to(torch.uint8)
        rem &= (1 << k) - 1
        return shifted, (_pack_unchecked(rem.reshape(-1), k) if packed else rem)
    rem = q & ((1 << k) - 1)
    if packed:
        return shifted, _pack_unchecked(rem.reshape(-1), k)
    return shifted, rem.to(_unpacked_dtype(k))


def shift_up(q_shifted: torch.Tensor, packed_remainder: torch.Tensor, k: int, *,
             packed: bool = True) -> torch.Tensor:
    """Exact inverse of :func:`shift_down`: ``q_shifted · 2^k + remainder``, bit for bit.

    ``packed`` must match the value given to :func:`shift_down`.  ``k = 0`` returns
    ``q_shifted`` itself.

    Raises:
        ValueError: ``q_shifted`` not int64, ``k`` out of range, the remainder has the
            wrong dtype/size for (numel, k, packed), or (unpacked) holds values outside
            [0, 2^k).
        FixedPointOverflow: ``q_shifted · 2^k`` overflows int64 (the input did not come from
            :func:`shift_down`).
    """
    k = _check_k(k)
    _check_stream(q_shifted, "q_shifted")
    if not isinstance(packed_remainder, torch.Tensor):
        raise ValueError(f"shift_up: remainder must be a torch.Tensor, got {type(packed_remainder).__name__}")
    if k == 0:
        if packed_remainder.numel() != 0:
            raise ValueError("shift_up with k=0 expects an empty remainder, got "
                             f"{packed_remainder.numel()} elements")
        return q_shifted
    n = q_shifted.numel()
    if packed:
        if packed_remainder.dtype != torch.uint8 or packed_remainder.dim() != 1:
            raise ValueError("shift_up(packed=True) expects a 1-D uint8 remainder, got "
                             f"{packed_remainder.dtype} of shape {tuple(packed_remainder.shape)} "
                             "(was shift_down called with packed=False?)")
        if packed_remainder.numel() != _packed_nbytes(n, k):
            raise ValueError(f"shift_up: remainder of {n} values x {k} bits must have "
                             f"{_packed_nbytes(n, k)} bytes, got {packed_remainder.numel()} (was shift_down "
                             "called with packed=False?)")
        rem = _unpack_unchecked(packed_remainder.contiguous(), k, n).view(q_shifted.shape)
    else:
        if packed_remainder.is_floating_point() or packed_remainder.dtype == torch.bool:
            raise ValueError(f"shift_up(packed=False) expects an integer remainder, got "
                             f"{packed_remainder.dtype}")
        if packed_remainder.shape != q_shifted.shape:
            raise ValueError(f"shift_up(packed=False): remainder shape {tuple(packed_remainder.shape)} "
                             f"!= q_shifted shape {tuple(q_shifted.shape)} (was shift_down called "
                             "with packed=True?)")
        rem = packed_remainder.to(q_shifted.dtype)
        if n:
            lo, hi = torch.aminmax(rem)
            if int(lo) < 0 or int(hi) >= (1 << k):
                raise ValueError(f"shift_up: remainder values must lie in [0, 2^{k}), got range "
                                 f"[{int(lo)}, {int(hi)}]")
    lim = 1 << (width(q_shifted) - 1 - k)
    if n and not (-lim <= int((mm := torch.aminmax(q_shifted)).min) and int(mm.max) < lim):
        raise FixedPointOverflow(f"shift_up: q_shifted << {k} overflows int{width(q_shifted)}; q_shifted did not "
                                 "come from shift_down with the same k")
    out = q_shifted << k
    out |= rem
    return out


def shift_up_unchecked(q_shifted: torch.Tensor, packed_remainder: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`shift_up` (packed remainder) without its checks, for callers that verify the result
    otherwise (the reversible backward compares a checksum of every rebuilt stream): the same bits
    for inputs that came from :func:`shift_down`; anything else gives wrapped garbage, not an error."""
    if k == 0:
        return q_shifted
    rem = _unpack_unchecked(packed_remainder.contiguous(), k, q_shifted.numel(), small=True).view(q_shifted.shape)
    out = q_shifted << k
    return out.bitwise_or_(rem)  # a uint8 remainder widens in the op, without an int64 copy


# ---------------------------------------------------------------------------------- checksum
_M64 = (1 << 64) - 1


def _s64(c: int) -> int:
    """Reinterpret an unsigned 64-bit constant as a signed int64 Python int."""
    c &= _M64
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)


def _weyl_keys(n: int, step: int, device, odd: bool = True) -> torch.Tensor:
    """n distinct int64 keys 2·(i+1)·step (+ 1 when `odd`), wrapping, i = 0..n-1."""
    key = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    key *= step
    key <<= 1
    if odd:
        key += 1
    return key


def _mix64_int(x: int) -> int:
    """SplitMix64's finalizer (a bijection of 64-bit words) on a Python int."""
    x &= _M64
    x ^= x >> 30
    x = (x * (_MIX1 & _M64)) & _M64
    x ^= x >> 27
    x = (x * (_MIX2 & _M64)) & _M64
    return x ^ (x >> 31)


def checksum(q: torch.Tensor) -> int:
    """Cheap position-sensitive 64-bit checksum of an int64 tensor (returned in [0, 2^64)).

    Over q viewed as rows of its last dimension: ``sum_c colsum_c · col_c + sum_r rowsum_r · row_r``
    mod 2^64, with distinct odd column keys ``col_c = 2·(c+1)·φ + 1`` and distinct even row keys
    ``row_r = 2·(r+1)·ψ`` (Weyl sequences; φ = 0x9E3779B97F4A7C15, ψ = 0xBF58476D1CE4E5B9), plus a mix
    of the shape.  Properties:

    * changing any single element by any nonzero amount delta always changes the checksum (by
      delta · (col_c + row_r), and col_c + row_r is odd: multiplying by an odd number is a bijection
      mod 2^64);
    * swapping two unequal elements changes a row sum or a column sum, and with it the checksum unless
      (q_a − q_b)·(col_a − col_b + row_a − row_b) ≡ 0 mod 2^64;
    * two int64 reductions over the tensor (its column sums and row sums), then two weighted sums of one
      value per column and per row: a third of the time of one matrix-vector product over it.

    Meant for verifying reconstructions (compare the checksum of a stream saved in forward
    with that of the stream rebuilt in backward) without keeping the stream.

    Raises:
        ValueError: ``q`` is not an int64 tensor.
    """
    _check_stream(q, "q")
    n = q.numel()
    shape_key = len(q.shape)
    for d in q.shape:
        shape_key = (shape_key * 1000003 + d + 1) & _M64
    total = _mix64_int(shape_key)
    if n:
        width = q.shape[-1] if q.dim() else 1
        rows = q.reshape(n // width, width)
        by_col = rows.sum(0) * _weyl_keys(width, _GOLDEN, q.device)
        by_row = rows.sum(1) * _weyl_keys(n // width, _MIX1, q.device, odd=False)
        total = (total + int(by_col.sum()) + int(by_row.sum())) & _M64
    return total


# ------------------------------------------------------------------------------- addition
def add_checked(a: torch.Tensor, b: torch.Tensor, what: str = "a + b") -> torch.Tensor:
    """``a + b`` in int64, raising :class:`FixedPointOverflow` on signed overflow.

    ``what`` names the sum in the error (the generated coupling programs pass the equation,
    e.g. ``"y1 = λ·x1 + F(x2)"``).  Both operands must have the same shape: a block whose
    output does not match the stream it is added to is an error, never a broadcast.

    Raises:
        ValueError: the shapes differ.
        FixedPointOverflow: some element of the sum leaves [-2^63, 2^63).
    """
    if a.shape != b.shape:
        raise ValueError(f"{what}: the update has shape {tuple(b.shape)}, the stream it is added to "
                         f"{tuple(a.shape)}")
    s = a + b
    top = 1 << (width(s) - 1)
    if torch.compiler.is_compiling():  # torch.export: the overflow test as an op of the exported program
        torch._assert_async(~((((a ^ s) & (b ^ s)) < 0).any()), f"{what}: int{width(s)} overflow in fixed point")
        return s
    if a.numel():  # fast path: two reductions, no temporaries; bounds add exactly as Python ints
        (alo, ahi), (blo, bhi) = ((int(v) for v in torch.aminmax(t)) for t in (a, b))
        if -top <= alo + blo and ahi + bhi < top:
            return s
    # Overflow iff a and b have the same sign and s has the other one.
    if bool((((a ^ s) & (b ^ s)) < 0).any()):
        raise FixedPointOverflow(f"{what} overflows int{width(s)} fixed point ({OVERFLOW_ADVICE})")
    return s


def sub_shifted(q: torch.Tensor, source: torch.Tensor, k: int, what: str = "q − (source >> k)") -> torch.Tensor:
    """``q − (source >> k)`` in int64, raising :class:`FixedPointOverflow` on signed overflow.

    The leak-compensated coupling's update term: a pretrained half F' = F − 2^-k·x quantized
    as ``quantize(F(x)) − (x >> k)``, integers the inverse recomputes from x exactly (``k = 0``:
    ``q − source``). ``what`` names the term in the error, as for :func:`add_checked`.

    Raises:
        ValueError: the shapes differ.
        FixedPointOverflow: some element of the difference leaves [-2^63, 2^63).
    """
    if q.shape != source.shape:
        raise ValueError(f"{what}: the update has shape {tuple(q.shape)}, its input stream {tuple(source.shape)}")
    leak = source >> k if k else source
    s = q - leak
    top = 1 << (width(s) - 1)
    if torch.compiler.is_compiling():  # torch.export: the overflow test as an op of the exported program
        torch._assert_async(~((((q ^ leak) & (q ^ s)) < 0).any()), f"{what}: int{width(s)} overflow in fixed point")
        return s
    if q.numel():  # fast path: the bounds subtract exactly as Python ints
        (qlo, qhi), (llo, lhi) = ((int(v) for v in torch.aminmax(t)) for t in (q, leak))
        if -top <= qlo - lhi and qhi - llo < top:
            return s
    # Overflow iff q and leak have different signs and s has leak's sign.
    if bool((((q ^ leak) & (q ^ s)) < 0).any()):
        raise FixedPointOverflow(f"{what} overflows int{width(s)} fixed point ({OVERFLOW_ADVICE})")
    return s


def sub_shifted_unchecked(q: torch.Tensor, source: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`sub_shifted` without its checks (inference programs check the stack's output instead)."""
    return q - (source >> k if k else source)
