"""A vocabulary head and its cross-entropy, computed in chunks: the full logits never exist.

`linear_cross_entropy(h, weight, bias, target)` equals
`F.cross_entropy(F.linear(h, weight, bias).to(logits_dtype), target, ...)` (mean or sum, with
`ignore_index` and label smoothing). Its forward computes the loss and, when a gradient is needed,
the gradients for `h`, `weight` and `bias` at once, with `chunk_bytes` of logits alive at a time;
the backward only scales them. Two schedules: "vocab" (default: all tokens, the vocabulary in
blocks, an online log-sum-exp) and "tokens" (chunks of tokens with whole logits rows, Liger's).
The head's gradient buffers exist only for the head tensors that require grad.

`ChunkedHeadLoss` is the module the `chunk_head_loss` pass puts into a program: in training under
grad it returns (loss, None) — no logits; otherwise the unchunked (loss, logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.chunks import fit

#: Default bytes of logits per chunk (`MEFTConfig.loss_chunk_bytes`).
DEFAULT_CHUNK_BYTES = 4 * 2 ** 20
REDUCTIONS = ("mean", "sum")


def chunk_rows(other: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Lines per chunk of logits in `dtype` whose other side is `other` long: tokens per chunk in "tokens"
    mode (other = the vocabulary), vocabulary columns per block in "vocab" mode (other = the tokens)."""
    return fit(other, torch.empty((), dtype=dtype).element_size(), chunk_bytes)


def _chunk(h, weight, bias, target, need, dtype, ignore_index: int, smoothing: float, scale):
    """(summed loss, grads of the tensors in `need` of the summed loss · scale) of one chunk of rows."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip((h, weight, bias), need)]
        logits = F.linear(*leaves)
        if dtype is not None:
            logits = logits.to(dtype)
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum", label_smoothing=smoothing)
        wanted = [t for t, n in zip(leaves, need) if n and t is not None]
        grads = iter(torch.autograd.grad(loss if scale is None else loss / scale, wanted)) if wanted else iter(())
    return loss.detach(), [next(grads) if n and t is not None else None for t, n in zip(leaves, need)]


def _by_tokens(h, weight, bias, target, need, dtype, ignore_index, smoothing, reduction, rows):
    """(summed loss, grads) in chunks of `rows` tokens, each with its whole row of logits (Liger's scheme)."""
    grads = [torch.zeros_like(t) if n and t is not None else None for t, n in zip((h, weight, bias), need)]
    total = torch.zeros((), dtype=_acc(h.dtype), device=h.device)
    count = (target != ignore_index).sum().clamp_min(1) if reduction == "mean" else None
    for s in range(0, h.shape[0], rows):
        loss, g = _chunk(h[s:s + rows], weight, bias, target[s:s + rows], need, dtype, ignore_index, smoothing, count)
        total += loss
        if g[0] is not None:
            grads[0][s:s + rows] = g[0]
        for i in (1, 2):
            if g[i] is not None:
                grads[i] += g[i]
    return total, grads


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Blocks:
    """The logits of every token in blocks of `cols` vocabulary entries (the linear, then its cast)."""

    def __init__(self, h, weight, bias, dtype, cols: int):
        self.h, self.weight, self.bias, self.dtype, self.cols = h, weight, bias, dtype, cols
        self.acc = _acc(dtype or torch.promote_types(h.dtype, weight.dtype))

    def __iter__(self):
        for v0 in range(0, self.weight.shape[0], self.cols):
            v1 = min(v0 + self.cols, self.weight.shape[0])
            lin = F.linear(self.h, self.weight[v0:v1], None if self.bias is None else self.bias[v0:v1])
            yield v0, v1, lin.dtype, (lin.to(self.dtype) if self.dtype is not None else lin).to(self.acc)


def _by_vocab(h, weight, bias, target, need, dtype, ignore_index, smoothing, reduction, cols):
    """(summed loss, grads) with every token at once and the vocabulary in blocks: an online log-sum-exp
    pass, which also accumulates softmax @ weight for the gradient of h (as flash attention accumulates
    softmax @ V); a second pass builds each block's softmax gradient only when the head itself trains."""
    blocks, V = _Blocks(h, weight, bias, dtype, cols), weight.shape[0]
    valid = target != ignore_index
    run_max = torch.full((h.shape[0],), -torch.inf, dtype=blocks.acc, device=h.device)
    run_sum, picked, row_sum = (torch.zeros_like(run_max) for _ in range(3))
    want_h = need[0] and not (need[1] or need[2])
    p_w = torch.zeros(h.shape, dtype=blocks.acc, device=h.device) if want_h else None  # Σ exp(logit − max)·w
    for v0, v1, lin_dtype, lg in blocks:
        hit = valid & (target >= v0) & (target < v1)
        picked[hit] = lg[hit, target[hit] - v0]
        if smoothing:
            row_sum += lg.sum(1)
        new_max = torch.maximum(run_max, lg.amax(1))
        rescale = (run_max - new_max).exp()
        p = lg.sub_(new_max[:, None]).exp_()
        run_sum = run_sum * rescale + p.sum(1)
        if want_h:
            p_w.mul_(rescale[:, None]).add_(p.to(lin_dtype) @ weight[v0:v1])
        run_max = new_max
    lse = run_max + run_sum.log()
    per_row = (1 - smoothing) * (lse - picked) + (smoothing * (lse - row_sum / V) if smoothing else 0)
    total = per_row[valid].sum()
    scale = valid.to(blocks.acc) / (valid.sum().clamp_min(1) if reduction == "mean" else 1)
    if want_h:
        return total, [_h_grad(p_w / run_sum[:, None], weight, target, valid, scale, smoothing).to(h.dtype), None, None]
    grads = [torch.zeros_like(t, dtype=blocks.acc) if n and t is not None else None
             for t, n in zip((h, weight, bias), need)]
    if any(need):
        _softmax_grads(blocks, target, valid, lse, scale, smoothing, grads)
    return total, [g.to(t.dtype) if g is not None else None for g, t in zip(grads, (h, weight, bias))]


def _h_grad(softmax_w, weight, target, valid, scale, smoothing: float):
    """d loss / d h = scale · (softmax @ W − (1 − ε)·W[target] − ε·mean(W)), rows not ignored."""
    g = softmax_w
    g[valid] -= (1 - smoothing) * weight[target[valid]].to(g.dtype)
    if smoothing:
        g -= smoothing * weight.to(g.dtype).mean(0)
    return g.mul_(scale[:, None])


def _softmax_grads(blocks: _Blocks, target, valid, lse, scale, smoothing: float, grads) -> None:
    """Add each block's d loss / d logits = scale · (softmax − (1 − ε)·onehot − ε/V) into the grads."""
    V = blocks.weight.shape[0]
    for v0, v1, lin_dtype, lg in blocks:
        g = lg.sub_(lse[:, None]).exp_()
        if smoothing:
            g.sub_(smoothing / V)
        hit = valid & (target >= v0) & (target < v1)
        g[hit, target[hit] - v0] -= 1 - smoothing
        g = g.mul_(scale[:, None]).to(lin_dtype)
        if grads[0] is not None:
            grads[0] += g @ blocks.weight[v0:v1]
        if grads[1] is not None:
            grads[1][v0:v1] = g.t() @ blocks.h
        if grads[2] is not None:
            grads[2][v0:v1] = g.sum(0, dtype=grads[2].dtype)


MODES = {"vocab": _by_vocab, "tokens": _by_tokens}


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, dtype, ignore_index, smoothing, reduction, mode, size):
        need = tuple(ctx.needs_input_grad[:3])
        with torch.no_grad():
            total, grads = MODES[mode](h, weight, bias, target, need, dtype, ignore_index, smoothing, reduction,
                                          size)
        if reduction == "mean":  # over the rows not ignored (the gradients were scaled already)
            total = total / (target != ignore_index).sum()
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.present = [g is not None for g in grads]
        return total.to(dtype if dtype is not None else torch.promote_types(h.dtype, weight.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads = [(g * grad_out).to(g.dtype) if p else None for g, p in zip(saved, ctx.present)]
        return (*grads, None, None, None, None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, *,
                         logits_dtype: torch.dtype | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean",
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES, mode: str = "vocab") -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight, bias).to(logits_dtype), target, ...)` without the full logits.

    Args:
        h: (N, D) hidden states, one row per target. weight: (V, D); bias: (V,) or None.
        target: (N,) class indices; rows equal to `ignore_index` count for nothing.
        logits_dtype: the dtype the loss is computed in (e.g. torch.float32 for a bf16 model, as HF
            casts the logits); None keeps the linear's dtype.
        reduction: "mean" (over the rows not ignored) or "sum".
        chunk_bytes: bytes of logits alive at a time.
        mode: "vocab" (default): every token at once, the vocabulary in blocks of
            chunk_bytes / (N · itemsize) columns — one pass with an online log-sum-exp that also
            accumulates softmax @ weight for h's gradient: two matmuls with the head, each as wide as
            the batch, like the unchunked loss (a second pass when the head's weight or bias trains).
            "tokens": chunks of chunk_bytes / (V · itemsize) tokens with their whole logits rows, the
            gradients taken at once (Liger's scheme: two matmuls, but thin ones, which a CPU runs at a
            fraction of its speed when chunks hold few tokens).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: linear_cross_entropy supports {', '.join(REDUCTIONS)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(map(repr, MODES))}")
    if h.dim() != 2 or target.dim() != 1 or target.shape[0] != h.shape[0]:
        raise ValueError(f"linear_cross_entropy needs h of shape (N, D) and target of shape (N,); got h "
                         f"{tuple(h.shape)}, target {tuple(target.shape)}")
    if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes!r} must be a positive integer (bytes of logits per chunk)")
    cdt = logits_dtype or torch.promote_types(h.dtype, weight.dtype)
    size = chunk_rows(weight.shape[0] if mode == "tokens" else h.shape[0], cdt, chunk_bytes)
    return _LinearCrossEntropy.apply(h, weight, bias, target, logits_dtype, int(ignore_index),
                                     float(label_smoothing), reduction, mode, size)


class ChunkedHeadLoss(nn.Module):
    """`(loss, logits)` of a head `linear(h, weight, bias)` and its cross-entropy; chunked in training.

    In training under grad the logits are never built: `(chunked loss, None)`. Otherwise (eval,
    no_grad) the unchunked ops the model's program had: `(loss, logits)`, bit for bit.
    """

    def __init__(self, *, logits_dtype, ignore_index: int, label_smoothing: float, reduction: str,
                 chunk_bytes: int, mode: str = "vocab"):
        super().__init__()
        self.mode = mode
        self.logits_dtype = logits_dtype
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.chunk_bytes = chunk_bytes

    def extra_repr(self) -> str:
        return (f"logits_dtype={self.logits_dtype}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, chunk_bytes={self.chunk_bytes}, "
                f"mode={self.mode!r}")

    def forward(self, h, weight, bias, target):
        rows = h.reshape(-1, h.shape[-1])
        flat_target = target.reshape(-1)
        kw = dict(ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, reduction=self.reduction)
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return linear_cross_entropy(rows, weight, bias, flat_target, logits_dtype=self.logits_dtype,
                                        chunk_bytes=self.chunk_bytes, mode=self.mode, **kw), None
        logits = F.linear(h, weight, bias)
        if self.logits_dtype is not None:
            logits = logits.to(self.logits_dtype)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_target, **kw), logits
