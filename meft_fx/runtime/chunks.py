"""Position-wise blocks (FFN, norms, adapters) run over the tokens in chunks: a bounded working set.

A block that treats every token alone — an FFN sub-block reading no context — gives the same
rows whether it sees all tokens at once or a few at a time. Every program of a coupling runs such
a half through `run_in_chunks` (forward, inverse, the `reversible=False` reference) and the
backward through `vjp_in_chunks`, so the widest intermediate alive is `chunk_bytes`, not
tokens × width. Chunks are consecutive rows in row-major order and every path runs them in the
same order, so the random draws of dropout inside the block are the same in the forward and in the
recompute (they differ from one unchunked draw, with the same distribution).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ChunkPlan", "fit", "run_in_chunks", "vjp_in_chunks"]


def fit(width: int, itemsize: int, chunk_bytes: int) -> int:
    """How many lines of `width` elements of `itemsize` bytes fit in `chunk_bytes` (at least one)."""
    return max(1, int(chunk_bytes) // max(1, width * itemsize))


@dataclass(frozen=True)
class ChunkPlan:
    """How a position-wise block is chunked: `width`, its widest activation per token (e.g. the FFN's
    intermediate size), and `chunk_bytes`, the bytes such an activation may take per chunk."""

    width: int
    chunk_bytes: int

    def rows(self, x: torch.Tensor) -> int:
        """Tokens per chunk for input `x` (all of them when they fit): as many chunks as the budget needs,
        of equal size (a last chunk of a few tokens would run its matmuls at a fraction of the speed)."""
        tokens, most = x.numel() // max(1, x.shape[-1]), fit(self.width, x.element_size(), self.chunk_bytes)
        chunks = -(-tokens // most)
        return -(-tokens // chunks) if chunks else most

    def __repr__(self) -> str:  # printed in the generated programs
        return f"ChunkPlan(width={self.width}, chunk_bytes={self.chunk_bytes})"


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def run_in_chunks(block, x: torch.Tensor, plan: ChunkPlan):
    """`block(x)` for a position-wise `block`, `plan.rows(x)` tokens at a time (one call when they fit)."""
    flat, rows = _rows(x), plan.rows(x)
    if flat.shape[0] <= rows:
        return block(x)
    outs = [block(flat[s:s + rows].unsqueeze(0)) for s in range(0, flat.shape[0], rows)]
    return torch.cat([_rows(o) for o in outs]).reshape(*x.shape[:-1], outs[0].shape[-1])


def vjp_in_chunks(block, leaf_input: bool, x: torch.Tensor, cotangent: torch.Tensor, params, plan: ChunkPlan):
    """(block(x) detached, d x, parameter grads) chunk by chunk: each chunk recomputed and back-propagated
    before the next, so one chunk's activations are alive at a time. The caller restores RNG and autocast."""
    flat, cot, rows = _rows(x.detach()), _rows(cotangent), plan.rows(x)
    whole = flat.shape[0] <= rows  # one call, shaped as the forward called it
    outs, d_in, per_chunk = [], [], []
    for s in range(0, flat.shape[0], rows):
        leaf = (x if whole else flat[s:s + rows].unsqueeze(0)).detach().requires_grad_(True)
        out = block(leaf if leaf_input else leaf.view_as(leaf))
        g = torch.autograd.grad(out, [leaf, *params], cot[s:s + rows].reshape(out.shape).to(out.dtype),
                                allow_unused=True)
        outs.append(_rows(out.detach()))
        d_in.append(_rows(g[0]))
        per_chunk.append(g[1:])
    grads = [None] * len(params)
    for g in reversed(per_chunk):  # last chunk first: the order autograd sums them in for `run_in_chunks`
        grads = [a if b is None else b if a is None else a + b for a, b in zip(grads, g)]
    out = torch.cat(outs).reshape(*x.shape[:-1], outs[0].shape[-1])
    return out, torch.cat(d_in).reshape(x.shape), grads
