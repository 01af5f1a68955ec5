"""How a reversible stack holds its two streams: float (the paper's) or fixed point (bit-exact).

A coupling is the same three equations in either arithmetic (λ on stream 1, β on stream 2):

    forward:   y1, r1 = update(x1, F(decode(x2)), λ)      inverse:   x2 = restore(y2, G(decode(y1)), r2, β)
               y2, r2 = update(x2, G(decode(y1)), β)                 x1 = restore(y1, F(decode(x2)), r1, λ)

A leak-compensated half (F' = F − λ·x, `meft_fx.runtime.coupling`) passes its input stream as
`source`: update then computes `new = scale·(prev − source) + out`, and restore adds `source` back.

An arithmetic says what `encode`/`decode` of a stream, `update` (with the residue r it keeps) and
its exact `restore` are, emits them into the generated programs (`meft_fx.runtime.codegen`), and
supplies the integrity fingerprint checked in the backward, the gradient dtype, and the
`reversible=False` reference. A new arithmetic is one class here plus one line in ARITHMETICS.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from . import fixed_point as fxp
from . import fused_steps

__all__ = ["StreamArithmetic", "FloatStreams", "FixedPointStreams", "ARITHMETICS", "make_arithmetic",
           "exponent_of"]


def exponent_of(scale: float, name: str = "scale") -> int:
    """k with scale == 2^-k exactly (k ≥ 0); ValueError naming the nearest powers of two otherwise."""
    s = float(scale)
    if not (0.0 < s <= 1.0) or not math.isfinite(s):
        raise ValueError(f"{name}={scale!r} must be a power of two 2^-k in (0, 1]")
    m, e = math.frexp(s)  # s = m·2^e, m in [0.5, 1)
    if m == 0.5:
        return 1 - e
    hi, lo = -e, 1 - e  # 2^-hi > s > 2^-lo
    raise ValueError(f"{name}={scale!r} is not a power of two; nearest: {2.0 ** -hi:g} ({_pow(hi)}) or "
                     f"{2.0 ** -lo:g} ({_pow(lo)})")


def _pow(k: int) -> str:
    return f"2^-{k}" if k else "2^0"


def scaled_add(prev: torch.Tensor, scale: float, update: torch.Tensor) -> torch.Tensor:
    """scale·prev + update (scale 1 is skipped, so it is exact): the float stream update."""
    return prev + update if scale == 1.0 else prev * scale + update


class StreamArithmetic:
    """The interface; see the module docstring. Instances are immutable and cheap."""

    name = ""
    #: Feed F/G a view of the recompute's leaf (True: the leaf itself); see `replay.replay_vjp`.
    leaf_input = True
    #: The generated programs are differentiable, so `reversible=False` is plain autograd through them.
    differentiable = True
    #: λ and β must be powers of two 2^-k (the scaling is a shift).
    powers_of_two = False
    #: `decode` makes a new tensor (not the stream itself), which a chunked block may overwrite with its output.
    decodes_to_new = False

    def __init__(self, frac_bits: int = fxp.DEFAULT_FRAC_BITS, stream_bits: int = 64):
        """Settings an arithmetic does not use (float streams: `frac_bits`, `stream_bits`) are ignored."""

    @property
    def key(self) -> tuple:
        """What distinguishes the programs this arithmetic generates (part of the program cache key)."""
        return (self.name,)

    def fused(self, steps) -> "StreamArithmetic":
        """This arithmetic with its steps compiled (`meft_fx.runtime.fused_steps`; `steps`: a FusedSteps),
        for stacks whose F and G are compiled; the same bits. Float streams: itself (two ops a step)."""
        return self

    @property
    def attributes(self) -> dict:
        """Objects the generated programs read as attributes (`get_attr`), by name."""
        return {}

    def check_scale(self, scale: float, name: str) -> None:
        """Raise ValueError when this arithmetic cannot use `scale` (λ or β)."""
        if not scale:
            raise ValueError(f"{name}={scale!r}: a coupling needs non-zero λ and β to be invertible")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return h

    def fingerprint(self, h1: torch.Tensor, h2: torch.Tensor):
        """A token of a coupling's inputs saved in forward and compared in backward (None: no check)."""
        return None

    def grad_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the stream gradients dy1/dy2 are kept in."""
        return dtype

    def stream_itemsize(self, dtype: torch.dtype) -> int:
        """Bytes per element of a stream held by the runtime."""
        return dtype.itemsize

    def residue_bits(self, scale: float) -> int:
        """Bits per element `update` keeps for `restore` (the stored residue)."""
        return 0

    def reference(self, stack, x: torch.Tensor, context) -> torch.Tensor:  # pragma: no cover - per subclass
        """The stack under ordinary autograd (`reversible=False` with grad), for non-differentiable programs."""
        raise NotImplementedError

    # -- graph emission: each returns the fx nodes of one step ---------------------------------------------
    def emit_decode(self, g: fx.Graph, h: fx.Node, dtype, name: str) -> fx.Node:
        return h

    def emit_update(self, g: fx.Graph, prev: fx.Node, out: fx.Node, scale: float, names: tuple, source=None):
        """(new stream, residue or None) nodes for `new = scale·prev + out`; names = (new, residue, equation).
        `source` (a leak-compensated half's input stream): `new = scale·(prev − source) + out`."""
        if source is not None:
            prev = g.create_node("call_function", operator.sub, (prev, source), name=f"{names[0]}_leak")
        if scale == 1.0:
            return g.create_node("call_function", operator.add, (prev, out), name=names[0]), None
        scaled = g.create_node("call_function", operator.mul, (prev, scale), name=f"{names[0]}_scaled")
        return g.create_node("call_function", operator.add, (scaled, out), name=names[0]), None

    def emit_restore(self, g: fx.Graph, new: fx.Node, out: fx.Node, residue, scale: float, name: str,
                     checked: bool = True, source=None) -> fx.Node:
        """The node of `prev` rebuilt from `new = scale·prev + out` (and the residue): (new − out) / scale
        (+ `source`, for a leak-compensated half). `checked=False`: the caller verifies the result (the
        backward's fingerprint), so range checks may be left out."""
        cast = g.create_node("call_method", "type_as", (out, new), name=f"{out.name}_cast")
        last = name if source is None else f"{name}_leak"
        diff = g.create_node("call_function", operator.sub, (new, cast), name=last if scale == 1.0 else f"{name}_diff")
        if scale != 1.0:
            diff = g.create_node("call_function", operator.truediv, (diff, scale), name=last)
        return diff if source is None else g.create_node("call_function", operator.add, (diff, source), name=name)


class FloatStreams(StreamArithmetic):
    """The paper's arithmetic: streams in the model's dtype, the inverse divides by λ and β.

    Rounding error grows ~1/λ per layer in the inverse: fine for shallow fp32 stacks, wrong
    gradients at depth 24 or in bf16 (see the README's numerics table).
    """

    name = "float"

    def reference(self, stack, x, context):
        return stack.run_programs(x, context)


class FixedPointStreams(StreamArithmetic):
    """Both streams in int64 (or, `stream_bits=32`, int32) fixed point (`frac_bits` fractional bits);
    λ = 2^-k1, β = 2^-k2.

    update:  y = (x >> k) + quantize(out), the k shifted-out bits kept (packed) as the residue;
    restore: x = shift_up(y − quantize(out), residue). Integer addition loses nothing, so the
    backward rebuilds every coupling's inputs bit for bit at any depth and dtype. A checksum of
    each coupling's inputs is the fingerprint; stream gradients are kept in at least fp32. The
    backward's restore runs unchecked (no range checks): the fingerprint catches any wrong rebuild,
    a NaN or overflow in a non-deterministic recompute included.
    """

    name = "exact"
    leaf_input = False
    differentiable = False
    powers_of_two = True
    decodes_to_new = True

    def __init__(self, frac_bits: int = fxp.DEFAULT_FRAC_BITS, stream_bits: int = 64):
        if stream_bits not in fxp.STREAM_DTYPES:
            raise ValueError(f"stream_bits={stream_bits!r} must be one of {sorted(fxp.STREAM_DTYPES)}")
        top = stream_bits - 2
        if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 1 <= frac_bits <= top:
            raise ValueError(f"frac_bits={frac_bits!r} must be an integer in [1, {top}] for {stream_bits}-bit streams")
        self.frac_bits, self.stream_bits = frac_bits, stream_bits
        self.stream_dtype = fxp.STREAM_DTYPES[stream_bits]

    @property
    def key(self) -> tuple:
        return (self.name, self.frac_bits) + ((self.stream_bits,) if self.stream_bits != 64 else ())

    def _q_args(self, out) -> tuple:
        """quantize's arguments: the int64 default left out, so int64 programs print as before."""
        return (out, self.frac_bits) + ((self.stream_dtype,) if self.stream_bits != 64 else ())

    def check_scale(self, scale, name):
        super().check_scale(scale, name)
        exponent_of(scale, name)

    def encode(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"an exact ReversibleStack takes a floating-point stream, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        return fxp.quantize(x, self.frac_bits, self.stream_dtype)

    def decode(self, h, dtype):
        return fxp.dequantize(h, self.frac_bits, dtype)

    def fingerprint(self, h1, h2):
        return fxp.checksum(h1), fxp.checksum(h2)

    def grad_dtype(self, dtype):
        """At least fp32 (the streams are 64-bit): the reversible backward and the reference then add
        the same numbers in the same precision; in bf16, re-associated sums would differ by ~2^-8."""
        return torch.float32 if dtype.itemsize < 4 else dtype

    def stream_itemsize(self, dtype):
        return self.stream_bits // 8

    def residue_bits(self, scale):
        return exponent_of(scale)

    def reference(self, stack, x, context):
        return _straight_through_reference(self, stack, x, context)

    def emit_decode(self, g, h, dtype, name):
        return g.create_node("call_function", fxp.dequantize, (h, self.frac_bits, dtype), name=name)

    def fused(self, steps):
        """Fused steps for int64 streams; int32 streams keep the eager steps (the kernels are int64's)."""
        return FusedFixedPointStreams(self.frac_bits, steps) if self.stream_bits == 64 else self

    def emit_update(self, g, prev, out, scale, names, source=None):
        new, residue, equation = names
        q = g.create_node("call_function", fxp.quantize, self._q_args(out), name=f"{out.name}_q")
        k = exponent_of(scale)
        if source is not None:  # quantize(F(x)) − (x >> k): F' = F − 2^-k·x in integers
            q = g.create_node("call_function", fxp.sub_shifted, (q, source, k, equation), name=f"{out.name}_leak")
        if k == 0:
            return g.create_node("call_function", fxp.add_checked, (prev, q, equation), name=new), None
        shifted = g.create_node("call_function", fxp.shift_down, (prev, k), name=f"{prev.name}_shift")
        kept = g.create_node("call_function", operator.getitem, (shifted, 0), name=f"{prev.name}_shifted")
        rem = g.create_node("call_function", operator.getitem, (shifted, 1), name=residue)
        return g.create_node("call_function", fxp.add_checked, (kept, q, equation), name=new), rem

    def emit_restore(self, g, new, out, residue, scale, name, checked=True, source=None):
        quantize, shift_up = (fxp.quantize, fxp.shift_up) if checked else (fxp.quantize_unchecked, fxp.shift_up_unchecked)
        q = g.create_node("call_function", quantize, self._q_args(out), name=f"{out.name}_q")
        k = exponent_of(scale)
        if source is not None:
            args = (q, source, k, f"{name}: the leak term") if checked else (q, source, k)
            q = g.create_node("call_function", fxp.sub_shifted if checked else fxp.sub_shifted_unchecked, args,
                              name=f"{out.name}_leak")
        diff = g.create_node("call_function", operator.sub, (new, q), name=f"{name}_shifted" if k else name)
        return g.create_node("call_function", shift_up, (diff, residue, k), name=name) if k else diff


class FusedFixedPointStreams(FixedPointStreams):
    """`FixedPointStreams` whose update and (unchecked) restore each call one compiled kernel
    (`meft_fx.runtime.fused_steps`): what a stack with compiled couplings runs. The same bits."""

    def __init__(self, frac_bits: int, steps):
        super().__init__(frac_bits)
        self.steps = steps

    @property
    def key(self) -> tuple:
        return super().key + ("fused",) + self.steps.settings_key()  # a new compile with the same settings: same programs

    @property
    def attributes(self) -> dict:
        return {"steps": self.steps}

    def emit_update(self, g, prev, out, scale, names, source=None):
        new, residue, equation = names
        steps = g.create_node("get_attr", "steps", name=f"{new}_steps")
        step = g.create_node("call_function", fused_steps.update,
                             (prev, out, steps, exponent_of(scale), self.frac_bits, equation),
                             {"source": source} if source is not None else {}, name=f"{new}_update")
        return (g.create_node("call_function", operator.getitem, (step, 0), name=new),
                g.create_node("call_function", operator.getitem, (step, 1), name=residue))

    def emit_restore(self, g, new, out, residue, scale, name, checked=True, source=None):
        if checked:
            return super().emit_restore(g, new, out, residue, scale, name, checked, source)
        steps = g.create_node("get_attr", "steps", name=f"{name}_steps")
        return g.create_node("call_function", fused_steps.restore,
                             (new, out, residue, steps, exponent_of(scale), self.frac_bits),
                             {"source": source} if source is not None else {}, name=name)


def _straight_through(carrier: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` exactly, with the gradient of `carrier` (identity, cast to the carrier's dtype)."""
    return value.detach() + (carrier - carrier.detach()).to(value.dtype)


def _straight_through_reference(arith: FixedPointStreams, stack, x, context):
    """The fixed-point stack under ordinary autograd: the reference of the reversible backward.

    Each stream is an int64 tensor plus a float carrier in `grad_dtype` that only carries the
    gradient of the float equations: F, G and the output see the dequantized int64 streams,
    attached to the carriers straight-through. So autograd computes what the reversible backward does.
    """
    fb, dtype, gd = arith.frac_bits, x.dtype, arith.grad_dtype(x.dtype)

    def deq(q, carrier):
        return _straight_through(carrier, fxp.dequantize(q, fb, dtype))

    def half(run, prev_q, prev_c, src_q, src_c, scale, compensated, what):
        """(new stream, its carrier) of `new = scale·prev + out` (out = run(decoded src)), compensated:
        `scale·(prev − src) + out`. The source's carrier is read through a view of its own, so that its
        two gradients (through the half and the leak) are summed before they meet the source's others,
        in the order the reversible backward adds them."""
        src_c = src_c.view_as(src_c) if compensated else src_c
        out = run(deq(src_q, src_c), context)
        k = exponent_of(scale)
        q = fxp.quantize(out, fb, arith.stream_dtype)
        if compensated:
            q = fxp.sub_shifted(q, src_q, k, what)
        new_q = fxp.add_checked(prev_q >> k if k else prev_q, q, what)
        return new_q, scaled_add(prev_c - src_c if compensated else prev_c, scale, out.to(gd))

    h1q = h2q = arith.encode(x)
    h1c = h2c = x.to(gd)
    for i, c in enumerate(stack.couplings):
        with stack.errors_named(i):
            y1q, y1c = half(c.f, h1q, h1c, h2q, h2c, c.lam, c.compensate_f, c.equation("F"))
            y2q, y2c = half(c.g, h2q, h2c, y1q, y1c, c.beta, c.compensate_g, c.equation("G"))
        h1q, h2q, h1c, h2c = (y2q, y1q, y2c, y1c) if c.swap else (y1q, y2q, y1c, y2c)
    return stack.select(deq(h1q, h1c), deq(h2q, h2c))


#: numerics name → arithmetic class (`MEFTConfig.numerics` chooses one).
ARITHMETICS = {"float": FloatStreams, "exact": FixedPointStreams}


def make_arithmetic(numerics: str, frac_bits: int = fxp.DEFAULT_FRAC_BITS, stream_bits: int = 64) -> StreamArithmetic:
    """The arithmetic named `numerics` ("float" or "exact"); `frac_bits` and `stream_bits` for fixed point."""
    if numerics not in ARITHMETICS:
        raise ValueError(f"numerics={numerics!r}: expected one of {', '.join(map(repr, ARITHMETICS))}")
    return ARITHMETICS[numerics](frac_bits=frac_bits, stream_bits=stream_bits)
