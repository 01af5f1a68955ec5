"""Dropout whose masks are drawn with `torch.rand`: the same distribution, half the CPU time.

On CPU, `torch.nn.functional.dropout` draws its mask with `bernoulli_`, which takes one 64-bit
draw from the generator per element (≈ 6 ns/element here: 18 ms for one BERT attention mask at
batch 8, sequence 256). A reversible backward draws every mask twice (forward and recompute), so
mask generation was ~20 % of a MEFT step. `keep_mask` compares `torch.rand` (one 32-bit draw per
element, 24-bit resolution) with p instead: keep probability 1 − p to within 2^-24, from the
global torch generator (so `torch.manual_seed` and the stack's RNG replay apply as before), drawn
in row-major order, so drawing a tensor in consecutive chunks gives the same mask as drawing it
whole. The masks are not the numbers `nn.Dropout` would draw for the same seed.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Dropout", "keep_mask", "apply_mask"]


def keep_mask(shape, p: float, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """A bool tensor, True with probability 1 − p (to 2^-24), from the global torch generator.

    `out`: a contiguous bool tensor of `shape` to write the mask into.
    """
    return torch.ge(torch.rand(shape, device=device), p, out=out)


def apply_mask(t: torch.Tensor, kept: torch.Tensor, p: float) -> torch.Tensor:
    """t ∘ kept / (1 − p), with the same bits as dropout's `t * noise` (noise = 1/(1 − p) or 0)."""
    scale = torch.ones((), dtype=t.dtype, device=t.device).div_(1 - p)
    return t.mul(kept).mul_(scale)


class Dropout(nn.Dropout):
    """`nn.Dropout` drawing its training-mode mask with `keep_mask` (see the module docstring).

    Eval mode, p = 0, p = 1 and `inplace=True` behave exactly like `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.p >= 1 or self.inplace or not x.is_floating_point():
            return super().forward(x)
        return apply_mask(x, keep_mask(x.shape, self.p, x.device), self.p)
