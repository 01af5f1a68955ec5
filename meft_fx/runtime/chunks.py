"""Position-wise blocks (FFN, norms, adapters) run over the tokens in chunks: a bounded working set.

A block that treats every token alone — an FFN sub-block, reading at most context that is the same
for every token (a norm's weight), which each chunk gets whole — gives the same rows whether it sees
all tokens at once or a few at a time. Every program of a coupling runs such
a half through `run_in_chunks` (forward, inverse, the `reversible=False` reference) and the
backward through `vjp_in_chunks`, so the widest intermediate alive is `chunk_bytes`, not
tokens × width. Chunks are consecutive rows in row-major order and every path runs them in the
same order, so the random draws of dropout inside the block are the same in the forward and in the
recompute (they differ from one unchunked draw, with the same distribution).

A half sharded by FSDP2 runs whole on every path (`meft_fx.runtime.sharded`): FSDP gathers its weights at
each call and treats a second call in one backward as a checkpoint's recompute, whose gradients it would
not reduce. A gated FFN inside still runs in slices of its intermediate width (`meft_fx.nn.sliced_ffn`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ahead import cotangent_ahead
from .sharded import is_sharded

__all__ = ["ChunkPlan", "MIN_EXPERT_ROWS", "fit", "run_in_chunks", "vjp_in_chunks", "backprop"]

#: A chunk of a half with routed experts holds at least enough tokens to give each expert this many rows on
#: average (tokens ≥ MIN_EXPERT_ROWS · experts / top-k): every chunk re-reads all the experts' weights and runs
#: one product per expert, which at a few dozen rows is slow (the README's Mixtral table: 8 chunks of 128
#: tokens, as the 3 MiB budget alone gives, against the 2 of 512 this floor gives).
MIN_EXPERT_ROWS = 128


def fit(width: int, itemsize: int, chunk_bytes: int) -> int:
    """How many lines of `width` elements of `itemsize` bytes fit in `chunk_bytes` (at least one)."""
    return max(1, int(chunk_bytes) // max(1, width * itemsize))


@dataclass(frozen=True)
class ChunkPlan:
    """How a position-wise block is chunked: `width`, its widest activation per token (e.g. the FFN's
    intermediate size), and `chunk_bytes`, the bytes such an activation may take per chunk. `min_rows`: the
    fewest tokens a chunk may hold, whatever the budget (routed experts: `MIN_EXPERT_ROWS` rows per expert);
    where it applies, the chunks hold between min_rows and 2 · min_rows tokens (all of them if fewer)."""

    width: int
    chunk_bytes: int
    compiled_width: int | None = None  # the width when the block is compiled (its sliced FFN runs whole there)
    min_rows: int = 1

    def rows(self, x: torch.Tensor, compiled: bool = False) -> int:
        """Tokens per chunk for input `x` (all of them when they fit): as many chunks as the budget needs,
        of equal size (a last chunk of a few tokens would run its matmuls at a fraction of the speed)."""
        width = self.compiled_width if compiled and self.compiled_width else self.width
        tokens, most = x.numel() // max(1, x.shape[-1]), fit(width, x.element_size(), self.chunk_bytes)
        chunks = -(-tokens // most) if most >= self.min_rows else tokens // self.min_rows  # floor: fewer, larger
        chunks = max(1, chunks)
        return -(-tokens // chunks)

    def __repr__(self) -> str:  # printed in the generated programs
        extra = f", compiled_width={self.compiled_width}" if self.compiled_width else ""
        extra += f", min_rows={self.min_rows}" if self.min_rows > 1 else ""
        return f"ChunkPlan(width={self.width}, chunk_bytes={self.chunk_bytes}{extra})"


def _compiled(block) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None  # nn.Module.compile


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _output_rows(x: torch.Tensor, first: torch.Tensor, reuse_input: bool) -> torch.Tensor:
    """Where the chunks' outputs go: `x`'s own rows when `reuse_input` and the output has x's width and
    dtype (each chunk overwrites the input rows it has finished with), else a new tensor."""
    if reuse_input and first.shape[-1] == x.shape[-1] and first.dtype == x.dtype and x.is_contiguous() \
            and not torch.compiler.is_compiling():
        return _rows(x)
    return first.new_empty((x.numel() // x.shape[-1], first.shape[-1]))


def run_in_chunks(block, x: torch.Tensor, plan: ChunkPlan, *context, reuse_input: bool = False):
    """`block(x, *context)` for a position-wise `block`, `plan.rows(x)` tokens at a time (one call when they
    fit); every chunk gets `context` whole (values that are the same for every token).

    `reuse_input=True` (x is a temporary of the caller's, no gradient through it): the output is
    written over x chunk by chunk, so no second tensor of x's size exists."""
    flat, rows = _rows(x), plan.rows(x, _compiled(block))
    if flat.shape[0] <= rows or is_sharded(block):  # FSDP2: one call, one gathering of its weights
        return block(x, *context)
    reuse_input = reuse_input and not (torch.is_grad_enabled() and x.requires_grad)
    out = None
    for s in range(0, flat.shape[0], rows):
        o = _rows(block(flat[s:s + rows].unsqueeze(0), *context))
        out = _output_rows(x, o, reuse_input) if out is None else out
        out[s:s + rows] = o
    return out.reshape(*x.shape[:-1], out.shape[-1])


def vjp_in_chunks(block, leaf_input: bool, x: torch.Tensor, cotangent: torch.Tensor, params, plan: ChunkPlan | None,
                  input_grad: bool = True, reuse_input: bool = False, grad_into: torch.Tensor | None = None,
                  context: tuple = (), accumulate: bool = False):
    """(block(x, *context) detached, d x, grads of `params`) chunk by chunk: each chunk recomputed and
    back-propagated before the next, so one chunk's activations are alive at a time. The caller restores
    RNG and autocast. `params`: the tensors to differentiate besides x (parameters, and context tensors
    that need a gradient: each chunk's share is summed). `plan` None: the block runs whole.

    `input_grad=False`: d x is not computed (None); autograd stops at the parameters.
    `reuse_input=True`: x is the caller's temporary; the output is written over x's rows once their chunk
    is back-propagated. `grad_into`: a tensor of x's shape to add d x into, in place (and return).
    `accumulate=True` (a block sharded by FSDP2): one call, whole, back-propagated with `torch.autograd.backward`
    so that the block's own parameters get their gradients in `.grad`, where FSDP reduces them (`backprop`).
    Neither keeps a list of chunks to concatenate, so the working set is one chunk's."""
    flat, cot = _rows(x.detach()), _rows(cotangent)
    rows = flat.shape[0] if plan is None or accumulate else plan.rows(x, _compiled(block))
    if flat.shape[0] <= rows:  # one call, shaped as the forward called it
        return _vjp_whole(block, leaf_input, x, cotangent, params, input_grad, grad_into, context, accumulate)
    out, d_in, per_chunk = None, None, []
    for s in range(0, flat.shape[0], rows):
        leaf = flat[s:s + rows].unsqueeze(0).detach().requires_grad_(input_grad or accumulate)
        o, g, pg = _chunk_vjp(block, leaf_input, leaf, cot[s:s + rows], params, input_grad, context, accumulate)
        out = _output_rows(x, o, reuse_input) if out is None else out
        out[s:s + rows] = o
        if g is not None:
            d_in = (_rows(grad_into) if grad_into is not None else g.new_empty(flat.shape)) if d_in is None else d_in
            if grad_into is not None:
                d_in[s:s + rows] += g
            else:
                d_in[s:s + rows] = g
        per_chunk.append(pg)
    grads = [None] * len(params)
    for g in reversed(per_chunk):  # last chunk first: the order autograd sums them in for `run_in_chunks`
        grads = [a if b is None else b if a is None else a + b for a, b in zip(grads, g)]
    d_x = grad_into if grad_into is not None else (d_in.reshape(x.shape) if d_in is not None else None)
    return out.reshape(*x.shape[:-1], out.shape[-1]), d_x, grads


def backprop(out: torch.Tensor, wrt: list, cotangent: torch.Tensor, accumulate: bool = False) -> list:
    """The gradients of `out` (given its `cotangent`) with respect to each of `wrt` (None: unused).

    `accumulate=True`: through `torch.autograd.backward` instead of `torch.autograd.grad`, so every other leaf
    that needs a gradient gets it in `.grad` — the parameters FSDP2 gathered for the block, which its hooks
    reduce-scatter — while `wrt` (leaves the caller made) are read back from theirs and left as they were."""
    if not out.requires_grad:
        return [None] * len(wrt)
    if not accumulate:
        return list(torch.autograd.grad(out, wrt, cotangent, allow_unused=True))
    before = [t.grad for t in wrt]
    for t in wrt:
        t.grad = None
    torch.autograd.backward(out, cotangent)
    got = [t.grad for t in wrt]
    for t, g in zip(wrt, before):
        t.grad = g
    return got


def _chunk_vjp(block, leaf_input: bool, leaf, cot_rows, params, input_grad: bool, context: tuple = (),
               accumulate: bool = False):
    """(output rows, d leaf rows or None, parameter grads) of one chunk. Its cotangent is handed ahead to a
    sliced FFN inside (`meft_fx.nn.sliced_ffn`), which then back-propagates while it recomputes."""
    with cotangent_ahead(cot_rows):
        out = block(leaf if leaf_input else leaf.view_as(leaf), *context)
    wrt = [leaf, *params] if input_grad else list(params)
    g = backprop(out, wrt, cot_rows.reshape(out.shape).to(out.dtype), accumulate)
    d_leaf = _rows(g[0]) if input_grad and g[0] is not None else None
    return _rows(out.detach()), d_leaf, (g[1:] if input_grad else g)


def _vjp_whole(block, leaf_input, x, cotangent, params, input_grad, grad_into, context=(), accumulate=False):
    leaf = x.detach().requires_grad_(input_grad or accumulate)
    out, d_leaf, grads = _chunk_vjp(block, leaf_input, leaf, _rows(cotangent), params, input_grad, context,
                                    accumulate)
    d_x = None if d_leaf is None else d_leaf.reshape(x.shape)
    if grad_into is not None:
        d_x = grad_into if d_x is None else grad_into.add_(d_x)
    return out.reshape(*x.shape[:-1], out.shape[-1]), d_x, grads
