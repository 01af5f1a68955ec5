"""Attention with dropout that keeps no (batch, heads, seq, seq) tensor for its backward.

`scaled_dot_product_attention` with `dropout_p > 0` cannot use a fused kernel on CPU: the math
path keeps the softmax, the dropout noise and the dropped probabilities, three float tensors of
shape (batch, heads, L, S) each, alive for the backward. In a reversible backward that working
set is the largest thing alive (12 MiB each for a BERT layer at batch 8, sequence 256), so
`chunked_attention` does the same math in chunks of the leading (batch, head) dimensions:

    forward:   per chunk  P = softmax(q·kᵀ·scale + mask);  out = (P ∘ keep / (1 − p)) · v
    saved:     q, k, v, the mask, and `keep` as one bool per score (a quarter of one float tensor)
    backward:  per chunk  recompute P, then dv = Pdᵀ·dout, dP = (dout·vᵀ) ∘ keep / (1 − p),
               dS = softmax_backward(dP, P), dq = dS·k·scale, dk = dSᵀ·q·scale

The dropout masks come from `meft_fx.nn.dropout.keep_mask` (`torch.rand`, half the CPU time of the
`bernoulli_` SDPA uses; not the same numbers for the same seed), drawn chunk by chunk in row-major
order, which is the same mask as drawing the whole tensor at once. Numerics otherwise follow SDPA's
math path: q and k are each scaled by √scale, bf16/fp16 are computed in fp32, all-masked rows give
zeros; with the same dropout mask the output is SDPA's to the bit (checked in the tests).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dropout import apply_mask, keep_mask

__all__ = ["AttentionWithDropout", "chunked_attention", "chunk_indices", "CHUNK_BYTES"]

#: Bytes of one chunk's (…, L, S) score tensor in the compute dtype; a chunk is at least one
#: (batch, head) slice. 2 MiB keeps BERT-base-sized chunks at one to a few batch elements.
CHUNK_BYTES = 2 * 2**20


class AttentionWithDropout(torch.nn.Module):
    """`scaled_dot_product_attention` whose attention dropout is on only in training mode.

    In training mode with dropout it runs `chunked_attention` (SDPA's math with `keep_mask`
    dropout, without keeping the (batch, heads, L, S) tensors for the backward), under
    torch.compile too (eagerly, behind a graph break: the same chunks and masks as eager); in
    eval mode or with a mask that needs a gradient it calls
    `torch.nn.functional.scaled_dot_product_attention`.
    """

    def __init__(self, p: float, is_causal: bool = False, scale=None, enable_gqa: bool = False):
        super().__init__()
        self.p, self.is_causal, self.scale, self.enable_gqa = float(p), bool(is_causal), scale, bool(enable_gqa)

    def forward(self, q, k, v, attn_mask=None):
        p = self.p if self.training else 0.0
        if p > 0 and not (isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad):
            return chunked_attention(q, k, v, attn_mask, p, self.is_causal, self.scale, self.enable_gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=self.is_causal,
                                              scale=self.scale, enable_gqa=self.enable_gqa)

    def extra_repr(self) -> str:
        return f"p={self.p}, is_causal={self.is_causal}, scale={self.scale}, enable_gqa={self.enable_gqa}"


def chunked_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
                      enable_gqa: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`,
    computed in chunks of the leading dimensions, keeping only q, k, v, the mask and a bool
    dropout mask for the backward. `attn_mask` gets no gradient (use SDPA for a learned mask).
    """
    if is_causal and attn_mask is not None:
        raise ValueError("chunked_attention: pass either attn_mask or is_causal=True, not both (as in SDPA)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"chunked_attention: dropout_p={dropout_p} must be in [0, 1)")
    device = q.device.type
    if torch.is_autocast_enabled(device):  # SDPA is a lower-precision op under autocast
        dt = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dt) if t.is_floating_point() else t for t in (q, k, v))
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        rep = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    with torch.autocast(device, enabled=False):
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        run = _chunked_behind_graph_break if torch.compiler.is_dynamo_compiling() else _ChunkedAttention.apply
        return run(q, k, v, attn_mask, float(dropout_p), bool(is_causal), scale, keep)


# ----------------------------------------------------------------------------- the Function

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def chunk_indices(lead: tuple, row_bytes: int):
    """Index tuples over the leading dims, in row-major order, each covering ≈ CHUNK_BYTES of scores."""
    if not lead:
        yield ()
        return
    per0 = row_bytes * math.prod(lead[1:])  # bytes of scores per index of dim 0
    if per0 <= CHUNK_BYTES or len(lead) == 1:
        step = max(1, CHUNK_BYTES // max(per0, 1))
        for i in range(0, lead[0], step):
            yield (slice(i, min(i + step, lead[0])),)
        return
    per1 = row_bytes * math.prod(lead[2:])
    step = max(1, CHUNK_BYTES // max(per1, 1))
    for i in range(lead[0]):
        for j in range(0, lead[1], step):
            yield (i, slice(j, min(j + step, lead[1])))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, p, is_causal, scale, keep):
        L, S = q.size(-2), k.size(-2)
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        cdt = _compute_dtype(q.dtype)
        sf = _scale_root(q, scale)
        qe, ke, ve = (t.expand(*lead, *t.shape[-2:]) for t in (q, k, v))
        mask = _expanded_mask(attn_mask, is_causal, lead, L, S, q.device)
        safe = _may_mask_a_row(attn_mask, is_causal)
        drop = torch.empty((*lead, L, S), dtype=torch.bool, device=q.device) if keep and p > 0 else None
        out = torch.empty((*lead, L, v.size(-1)), dtype=q.dtype, device=q.device)
        for idx in chunk_indices(tuple(lead), L * S * torch.finfo(cdt).bits // 8):
            probs = _dropped_probs(qe[idx], ke[idx], None if mask is None else mask[idx], p, sf, cdt, safe,
                                   None if drop is None else drop[idx])
            out[idx] = torch.matmul(probs, ve[idx].to(cdt))
        if keep:
            ctx.save_for_backward(q, k, v, attn_mask, drop)
            ctx.p, ctx.is_causal, ctx.sf, ctx.lead, ctx.safe = p, is_causal, sf, lead, safe
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, attn_mask, drop = ctx.saved_tensors
        p, sf, lead = ctx.p, ctx.sf, ctx.lead
        L, S = q.size(-2), k.size(-2)
        cdt = _compute_dtype(q.dtype)
        qe, ke, ve = (t.expand(*lead, *t.shape[-2:]) for t in (q, k, v))
        mask = _expanded_mask(attn_mask, ctx.is_causal, lead, L, S, q.device)
        dout = dout.expand(*lead, L, v.size(-1))
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = torch.empty(qe.shape, dtype=q.dtype, device=q.device) if need_q else None
        dk = torch.empty(ke.shape, dtype=k.dtype, device=k.device) if need_k else None
        dv = torch.empty(ve.shape, dtype=v.dtype, device=v.device) if need_v else None
        for idx in chunk_indices(tuple(lead), L * S * torch.finfo(cdt).bits // 8):
            qc, kc, vc, do = qe[idx].to(cdt), ke[idx].to(cdt), ve[idx].to(cdt), dout[idx].to(cdt)
            probs = _probs(qc, kc, None if mask is None else mask[idx], sf, cdt, ctx.safe)
            dropped = apply_mask(probs, drop[idx], p) if p > 0 else probs
            if need_v:
                dv[idx] = torch.matmul(dropped.transpose(-2, -1), do)
            del dropped
            dprobs = torch.matmul(do, vc.transpose(-2, -1))
            if p > 0:
                dprobs = apply_mask(dprobs, drop[idx], p)
            dscores = torch._softmax_backward_data(dprobs, probs, -1, cdt)
            del dprobs, probs
            if need_q:
                dq[idx] = torch.matmul(dscores, kc * sf) * sf
            if need_k:
                dk[idx] = torch.matmul(dscores.transpose(-2, -1), qc * sf) * sf
        return (_reduce(dq, q), _reduce(dk, k), _reduce(dv, v)) + (None,) * 5


def _probs(q, k, mask, sf, cdt, safe):
    """softmax(q·√sf · (k·√sf)ᵀ + mask); `safe`: rows that are entirely masked give zeros (SDPA's
    `_safe_softmax`), else a plain softmax (the same bits wherever a row has an unmasked score)."""
    scores = torch.matmul(q.to(cdt) * sf, k.to(cdt).transpose(-2, -1) * sf)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(mask.logical_not(), float("-inf"))
        else:
            scores.add_(mask.to(cdt))
    return torch.ops.aten._safe_softmax(scores, -1) if safe else torch.softmax(scores, -1)


def _may_mask_a_row(attn_mask, is_causal: bool) -> bool:
    """Whether some row of the scores can be entirely -inf (then the safe softmax is needed)."""
    if is_causal:
        return False  # top-left aligned: row i keeps column 0
    if attn_mask is None:
        return False
    if attn_mask.dtype == torch.bool:
        return bool(attn_mask.logical_not().all(-1).any())
    return bool(torch.isneginf(attn_mask).all(-1).any())


def _scale_root(q, scale) -> float:
    """√scale: SDPA's math path multiplies q and k by it (scale defaults to 1/√E)."""
    return math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.size(-1)))


def _dropped_probs(q, k, mask, p, sf, cdt, safe, drop_out=None):
    """`_probs` with dropout applied (mask drawn by `keep_mask`, written into `drop_out` if given)."""
    probs = _probs(q, k, mask, sf, cdt, safe)
    if p > 0:
        probs = apply_mask(probs, keep_mask(probs.shape, p, q.device, out=drop_out), p)
    return probs


def _apply_chunked(*args):
    return _ChunkedAttention.apply(*args)


#: Under torch.compile the chunked Function runs eagerly behind a graph break: its working set stays
#: one chunk (traced, it would be one (batch, heads, L, S) chunk), and its dropout masks are eager's.
_chunked_behind_graph_break = torch.compiler.disable(
    _apply_chunked, reason="meft_fx chunked attention (bounded working set, eager dropout masks)")


def _expanded_mask(attn_mask, is_causal, lead, L, S, device):
    if is_causal:
        return torch.ones(L, S, dtype=torch.bool, device=device).tril().expand(*lead, L, S)
    if attn_mask is None:
        return None
    return attn_mask.expand(*lead, L, S)


def _reduce(grad, like):
    """Sum a gradient taken on the broadcast shape back to the input's shape."""
    if grad is None:
        return None
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad
