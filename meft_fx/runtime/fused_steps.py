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

from dataclasses import dataclass, field

import torch
from torch import nn

from . import fixed_point as fxp

__all__ = ["FusedSteps", "update", "restore"]


def _update_body(prev: torch.Tensor, out: torch.Tensor, k: int, frac_bits: int):
    """(new, the k low bits of prev or None, flag) of `new = (prev >> k) + quantize(out)`; flag: some check may fail."""
    work = out.detach() if out.dtype == torch.float64 else out.detach().to(torch.float32)
    q = (work * (2.0 ** frac_bits)).round().to(torch.int64)
    kept = prev >> k if k else prev
    new = kept + q
    flag = ~(work.abs() < 2.0 ** (63 - frac_bits)).all() | (((kept ^ new) & (q ^ new)) < 0).any()
    low = None if not k else (prev.to(torch.uint8) & ((1 << k) - 1)) if k <= 8 else prev & ((1 << k) - 1)
    return new, low, flag


def _restore_body(new: torch.Tensor, out: torch.Tensor, low, k: int, frac_bits: int) -> torch.Tensor:
    """`(new − quantize_unchecked(out)) · 2^k + low` (`low`: the unpacked residue, any integer dtype)."""
    diff = new - fxp.quantize_unchecked(out, frac_bits)
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
    """`_restore_body`, likewise (its own class: dynamo caches compiled code per function, up to a limit)."""

    def forward(self, new, out, low):
        return _restore_body(new, out, low, self.k, self.frac_bits)


_KERNELS = {"update": _Update, "restore": _Restore}
#: Kernels shared by every stack compiled with the same settings: the compiled code of a function holds a
#: limited number of variants (`torch._dynamo.config.recompile_limit`), and each kernel object is one.
_SHARED: dict = {}


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
        "triton.cudagraphs"): a CUDA graph's outputs are overwritten by its next run, and an update's output is
        the stream every later coupling reads. (No matrix products here: nothing for autotuning to tune.)"""
        s = self.settings
        options = {k: v for k, v in (s.get("options") or {}).items() if k != "triton.cudagraphs"}
        return dict(backend=s.get("backend", "inductor"), options=options or None, dynamic=s.get("dynamic", True))

    def _shared(self, key) -> nn.Module:
        kwargs = self.compile_kwargs()
        try:
            shared = key + (kwargs["backend"], tuple(sorted((kwargs["options"] or {}).items())), kwargs["dynamic"])
            hash(shared)
        except TypeError:  # unhashable settings: this stack's own kernel
            shared = None
        kernel = _SHARED.get(shared) if shared is not None else None
        if kernel is None:
            kernel = _KERNELS[key[0]](*key[1:])
            kernel.compile(**kwargs)
            if shared is not None:
                _SHARED[shared] = kernel
        return kernel

    def __deepcopy__(self, memo):  # a copied model compiles its own kernels (compiled functions are not copied)
        return FusedSteps(dict(self.settings))

    def __repr__(self) -> str:  # printed in the generated programs
        return f"FusedSteps(backend={self.settings.get('backend', 'inductor')!r})"


def update(prev: torch.Tensor, out: torch.Tensor, steps: FusedSteps, k: int, frac_bits: int, what: str):
    """(new, residue) of the exact update `new = 2^-k·prev + out` (`FixedPointStreams.emit_update`'s steps),
    compiled; the eager steps on the same values when the kernel flags a possible overflow."""
    new, low, flag = steps.kernel("update", k, frac_bits)(prev.reshape(-1), out.reshape(-1))  # 1-D: one size
    if bool(flag):
        return _eager_update(prev, out, k, frac_bits, what)
    return new.view(prev.shape), (None if low is None else fxp._pack_unchecked(low, k))


def _eager_update(prev, out, k: int, frac_bits: int, what: str):
    q = fxp.quantize(out, frac_bits)
    if not k:
        return fxp.add_checked(prev, q, what), None
    kept, residue = fxp.shift_down(prev, k)
    return fxp.add_checked(kept, q, what), residue


def restore(new: torch.Tensor, out: torch.Tensor, residue, steps: FusedSteps, k: int, frac_bits: int):
    """`prev` rebuilt from `new = 2^-k·prev + out` without range checks (the backward's restore), compiled."""
    low = fxp._unpack_unchecked(residue.contiguous(), k, new.numel(), small=True) if k else None
    return steps.kernel("restore", k, frac_bits)(new.reshape(-1), out.reshape(-1), low).view(new.shape)
