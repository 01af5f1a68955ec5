"""The fixed-point steps of a compiled stack, each run as one compiled kernel.

A stack whose couplings' F and G are compiled (`ReversibleStack.compile_couplings`) runs its exact
stream arithmetic compiled too. Eagerly, an update

    y, r = (x >> k) + quantize(out),  the k low bits of x   (r, packed)

is about ten passes over the stream and three range reductions, each read back to the host
(`fixed_point.quantize`, `shift_down`, `add_checked`); the backward's restore is about as many.
Compiled (with F's and G's backend, options and dynamic shapes, never CUDA graphs), each is one
compiled call: the packing of the kept bits stays eager (fused with the rest, inductor made the
whole update 10x slower). The update's kernel also returns
one flag, true when any of the eager checks might fail (a value of `out` not finite or outside the
range int64 holds, a sum that overflows); then the eager steps run on the same values and raise
their precise error (or, at the very edge of the range, where the flag is conservative, return
the same result). Either way the bits are the eager steps' (tested).

The generated programs call `update` and `restore` with the stack's `FusedSteps` (a program
attribute, printed like a ChunkPlan); the kernels are compiled on first use, one per shift and
settings, shared by the stacks that use them.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from . import fixed_point as fxp

__all__ = ["FusedSteps", "update", "restore"]


def _update_body(prev: torch.Tensor, out: torch.Tensor, k: int, frac_bits: int, source=None):
    """(new, the k low bits of prev or None, flag) of `new = (prev >> k) + quantize(out)` (with a `source`:
    `+ quantize(out) − (source >> k)`, the leak-compensated update); flag: some check may fail."""
    work = out.detach() if out.dtype == torch.float64 else out.detach().to(torch.float32)
    q = (work * (2.0 ** frac_bits)).round().to(torch.int64)
    flag = ~(work.abs() < 2.0 ** (63 - frac_bits)).all()
    if source is not None:
        leak = source >> k if k else source
        diff = q - leak
        flag = flag | (((q ^ leak) & (q ^ diff)) < 0).any()
        q = diff
    kept = prev >> k if k else prev
    new = kept + q
    flag = flag | (((kept ^ new) & (q ^ new)) < 0).any()
    low = None if not k else (prev.to(torch.uint8) & ((1 << k) - 1)) if k <= 8 else prev & ((1 << k) - 1)
    return new, low, flag


def _restore_body(new: torch.Tensor, out: torch.Tensor, low, k: int, frac_bits: int, source=None) -> torch.Tensor:
    """`(new − quantize_unchecked(out)) · 2^k + low` (`low`: the unpacked residue, any integer dtype); with a
    `source`, `quantize_unchecked(out) − (source >> k)` in place of the quantized output."""
    q = fxp.quantize_unchecked(out, frac_bits)
    if source is not None:
        q = q - (source >> k if k else source)
    diff = new - q
    return (diff << k) | low if k else diff


class _Update(nn.Module):
    """`_update_body` with its shift and fractional bits fixed, compiled as a module: integer attributes of a
    module are constants of the compiled code, where integer arguments (or closure variables) would be symbols
    under dynamic shapes, and a shift by a symbol is not vectorized (3x slower here)."""

    def __init__(self, k: int, frac_bits: int):
        super().__init__()
        self.k, self.frac_bits = k, frac_bits

    def forward(self, prev, out):
        return _update_body(prev, out, self.k, self.frac_bits)


class _Restore(_Update):
    """`_restore_body`, likewise."""

    def forward(self, new, out, low):
        return _restore_body(new, out, low, self.k, self.frac_bits)


class _LeakUpdate(_Update):
    """`_update_body` of a leak-compensated half (its input stream as `source`)."""

    def forward(self, prev, out, source):
        return _update_body(prev, out, self.k, self.frac_bits, source)


class _LeakRestore(_Update):
    """`_restore_body` of a leak-compensated half."""

    def forward(self, new, out, low, source):
        return _restore_body(new, out, low, self.k, self.frac_bits, source)


_KERNELS = {"update": _Update, "restore": _Restore, "leak_update": _LeakUpdate, "leak_restore": _LeakRestore}
#: Compiled kernels by (step, k, frac_bits, backend, options, dynamic), shared by every stack of those settings.
_SHARED: dict = {}


def _kernel(name: str, k: int, frac_bits: int) -> nn.Module:
    """A `name` kernel whose forward is a code object of its own: dynamo keeps a function's compiled variants
    (dtype, grad mode, device, size 0 or 1) on its code object, at most `recompile_limit` (8) of them, past which
    the function runs eagerly — shared by every shift and setting, they would run out."""
    base = _KERNELS[name]
    fwd = base.forward
    code = fwd.__code__.replace(co_name=f"{name}_k{k}_f{frac_bits}")
    forward = types.FunctionType(code, fwd.__globals__, code.co_name, fwd.__defaults__, fwd.__closure__)
    return type(f"{base.__name__}K{k}F{frac_bits}", (base,), {"forward": forward})(k, frac_bits)


@dataclass(eq=False)
class FusedSteps:
    """The compile settings of a stack's couplings (backend, mode, options, dynamic) and the kernels
    compiled with them, made on first use (shared with other stacks of the same settings)."""

    settings: dict
    kernels: dict = field(default_factory=dict, repr=False)

    def kernel(self, name: str, k: int, frac_bits: int) -> nn.Module:
        """The compiled `name` step ("update" or "restore") for shift `k` and `frac_bits`."""
        key = (name, k, frac_bits)
        if key not in self.kernels:
            self.kernels[key] = self._shared(key)
        return self.kernels[key]

    def compile_kwargs(self) -> dict:
        """The couplings' settings without CUDA graphs (`mode` "reduce-overhead" or "max-autotune", option
        "triton.cudagraphs", backend "cudagraphs": then "eager"): a CUDA graph's outputs are overwritten by its
        next run, and an update's output is the stream every later coupling reads. (No matrix products here:
        nothing for autotuning to tune.)"""
        s = self.settings
        backend = s.get("backend", "inductor")
        options = {k: v for k, v in (s.get("options") or {}).items() if k != "triton.cudagraphs"}
        return dict(backend="eager" if backend == "cudagraphs" else backend, options=options or None,
                    dynamic=s.get("dynamic", True))

    @functools.cached_property
    def _settings_key(self) -> tuple:
        kwargs = self.compile_kwargs()
        key = (kwargs["backend"], tuple(sorted((kwargs["options"] or {}).items())), kwargs["dynamic"])
        try:
            hash(key)
        except TypeError:
            return ("this", id(self))
        return key

    def settings_key(self) -> tuple:
        """What the kernels depend on: (backend, options, dynamic) of `compile_kwargs`, or this object's identity
        when those are not hashable (part of the kernels' and the generated programs' cache keys, so it is read on
        every program lookup: made once)."""
        return self._settings_key

    def _shared(self, key) -> nn.Module:
        settings = self.settings_key()
        kernel = _SHARED.get(key + settings) if settings[0] != "this" else None
        if kernel is None:
            kernel = _kernel(*key)
            kernel.compile(**self.compile_kwargs())
            if settings[0] != "this":  # unhashable settings: this object's own kernels
                _SHARED[key + settings] = kernel
        return kernel

    def __deepcopy__(self, memo):  # the copy looks its kernels up again (compiled modules are not copied)
        return FusedSteps(dict(self.settings))

    def __repr__(self) -> str:  # printed in the generated programs
        return f"FusedSteps(backend={self.settings.get('backend', 'inductor')!r})"


def update(prev: torch.Tensor, out: torch.Tensor, steps: FusedSteps, k: int, frac_bits: int, what: str,
           source: torch.Tensor | None = None):
    """(new, residue) of the exact update `new = 2^-k·prev + out` (`FixedPointStreams.emit_update`'s steps;
    with a leak-compensated half's input stream `source`, `2^-k·(prev − source) + out`), compiled; the eager
    steps (and their errors) for values the kernel flags and for inputs they refuse (shapes that differ, a
    stream not int64, an update not floating point)."""
    if out.shape != prev.shape or prev.dtype != torch.int64 or not out.is_floating_point() or (
            source is not None and (source.shape != prev.shape or source.dtype != torch.int64)):
        return _eager_update(prev, out, k, frac_bits, what, source)
    with torch.no_grad():  # integer results: no graph; one grad mode, one compiled variant
        flat = (prev.reshape(-1), out.reshape(-1)) + (() if source is None else (source.reshape(-1),))  # 1-D: one size
        new, low, flag = steps.kernel("update" if source is None else "leak_update", k, frac_bits)(*flat)
    if bool(flag):
        return _eager_update(prev, out, k, frac_bits, what, source)
    return new.view(prev.shape), (None if low is None else fxp._pack_unchecked(low, k))


def _eager_update(prev, out, k: int, frac_bits: int, what: str, source=None):
    q = fxp.quantize(out, frac_bits)
    if source is not None:
        q = fxp.sub_shifted(q, source, k, what)
    if not k:
        return fxp.add_checked(prev, q, what), None
    kept, residue = fxp.shift_down(prev, k)
    return fxp.add_checked(kept, q, what), residue


def restore(new: torch.Tensor, out: torch.Tensor, residue, steps: FusedSteps, k: int, frac_bits: int,
            source: torch.Tensor | None = None):
    """`prev` rebuilt from `new = 2^-k·prev + out` (or `2^-k·(prev − source) + out`) without range checks
    (the backward's restore), compiled."""
    low = fxp._unpack_unchecked(residue.contiguous(), k, new.numel(), small=True) if k else None
    flat = (new.reshape(-1), out.reshape(-1), low) + (() if source is None else (source.reshape(-1),))
    with torch.no_grad():
        return steps.kernel("restore" if source is None else "leak_restore", k, frac_bits)(*flat).view(new.shape)
