"""The exact streams' integer width, chosen for the model being converted (`MEFTConfig.stream_bits=None`).

The two top streams are the reversible stack's one stored state that grows with the hidden size and not with
depth: 2 × 64 bits per element in int64. For a bf16 (or fp16) model that is 8 bf16 layers' worth of
checkpointing, so the streams are int32 where the activations fit:

* **bf16 / fp16 models**: int32 with f = min(16, 31 − ⌈log2(HEADROOM · reach)⌉) fractional bits, where `reach` is
  the largest |hidden state| the original model shows at its layers' inputs and outputs on the starting point's
  probe; HEADROOM = 4 (2 bits) leaves room for fine-tuning to grow the stream. Resolution 2^-f is finer than
  the dtype's own rounding at every |x| ≥ 2^(8 − f) (bf16: 8 significant bits). When f would be below
  MIN_INT32_FRAC_BITS, int64.
* **float32 / float64 models**: int64 (int32's resolution would be coarser than their own rounding).

A stream that leaves the range later raises FixedPointOverflow naming frac_bits and stream_bits=64 (the
backward never sees it: the forward checks every update). `explain` prints the choice and the reach.
SmolLM2-135M-Instruct in bf16: reach 24448 (massive activations), so int32 with f = 14 (range ±131072).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .capture import module_mode
from .config import INT32_FRAC_BITS
from .runtime import stacks_in
from .runtime.fixed_point import DEFAULT_FRAC_BITS

__all__ = ["StreamChoice", "choose_streams", "bf16_stream_bits", "HEADROOM", "MIN_INT32_FRAC_BITS", "NARROW_DTYPES"]

HEADROOM = 4
MIN_INT32_FRAC_BITS = 12
NARROW_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class StreamChoice:
    """The width chosen (`bits`, `frac_bits`), the measured `reach` (None: not measured) and why."""

    bits: int
    frac_bits: int
    reach: float | None
    why: str

    def __str__(self) -> str:
        return f"int{self.bits} with {self.frac_bits} fractional bits: {self.why}"


def choose_streams(conv: nn.Module, reach: float | None, dtype: torch.dtype) -> StreamChoice:
    """The width for `conv`'s streams from the measured `reach` and the model's `dtype` (and `frac_bits` when its
    config gives them); applied to every stack of `conv` (all its captured call structures) and to its config, so
    later captures and saved adapters keep it."""
    choice = _choice(reach, dtype, conv.config.frac_bits)
    for stack in conv.stacks:
        stack.set_streams(choice.bits, choice.frac_bits)
    conv.config = dataclasses.replace(conv.config, stream_bits=choice.bits, frac_bits=choice.frac_bits)
    conv.stream_choice = choice
    return choice


def bf16_stream_bits(choice: StreamChoice | None) -> int | None:
    """The stream width convert would choose for the same model in bf16 (its measured reach); None: not chosen."""
    return None if choice is None else _choice(choice.reach, torch.bfloat16, None).bits


def _choice(reach: float | None, dtype: torch.dtype, given: int | None) -> StreamChoice:
    wide = given if given is not None else DEFAULT_FRAC_BITS
    if dtype not in NARROW_DTYPES:
        return StreamChoice(64, wide, reach, f"{dtype} model (int32's resolution would be coarser than its own "
                                             f"rounding)")
    if reach is None or not math.isfinite(reach):
        return StreamChoice(64, wide, reach, "the streams' range could not be measured")
    most = 31 - math.ceil(math.log2(max(HEADROOM * reach, 1.0)))  # fractional bits int32 leaves, with headroom
    f = min(INT32_FRAC_BITS, most) if given is None else given
    where = f"the hidden state reaches |x| = {reach:.4g} on the probe"
    if f > most or f < MIN_INT32_FRAC_BITS:
        return StreamChoice(64, wide, reach, f"{where}; int32 would leave {most} fractional bits with {HEADROOM}× "
                                             f"headroom" + (f", not frac_bits={given}" if given is not None else
                                                            f" (fewer than {MIN_INT32_FRAC_BITS})"))
    return StreamChoice(32, f, reach, f"{where}, {HEADROOM}× headroom → range ±{2.0 ** (31 - f):g} ({dtype} model; "
                                      f"int64 would keep 2 × 64 bits per element, int32 2 × 32)")


def reach_hooks(conv: nn.Module) -> tuple[list, list]:
    """(hook handles, a one-element list holding the running max |x|) over the inputs and outputs of the layers of
    `conv.original` that its stacks replaced; remove the handles after one forward of the original."""
    found = [0.0]
    paths = {c.record.layer for m in stacks_in(conv.graph_module) for c in m.couplings}

    def seen(t) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            found[0] = max(found[0], float(t.detach().abs().amax()))

    def hook(mod, args, out):
        seen(args[0] if args else None)
        seen(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [conv.original.get_submodule(p).register_forward_hook(hook) for p in sorted(paths) if p]
    return handles, found


def measured_reach(conv: nn.Module, call) -> float | None:
    """Max |hidden state| at `conv.original`'s replaced layers for `call` = (args, kwargs), eval, no grad."""
    handles, found = reach_hooks(conv)
    if not handles:
        return None
    try:
        with torch.no_grad(), module_mode(conv.original, False):
            conv.original(*call[0], **call[1])
    finally:
        for h in handles:
            h.remove()
    return found[0]
