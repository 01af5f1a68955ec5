"""Routed experts' grouped matrix product whose backward computes only the gradients that are wanted.

transformers' MoE layers multiply each expert's rows by its weight with a grouped product; traced, in any
dtype but bfloat16, that is the custom op `transformers::grouped_mm_fallback` (one `mm` per expert). Its
backward always computes the experts' weight gradient as well: a zero-filled tensor of all the experts'
weights and one more `mm` per expert, also when the experts are frozen — as they are in a MEFT model,
where only adapters train. `grouped_mm` is the same forward (the same `mm` calls, so the same bits) with a
backward that computes d input and d weight only when each is wanted, and keeps for it only what those
need (x for d weight, the weight for d input). The `grouped_experts` pass puts it in place of the op.
"""
from __future__ import annotations

import torch

__all__ = ["grouped_mm", "GroupedMM"]


def _groups(offs: torch.Tensor):
    """(expert, start, end) of every non-empty group; `offs` are the groups' cumulative ends."""
    start = 0
    for i, end in enumerate(offs.tolist()):
        if end != start:
            yield i, start, end
        start = end


def _forward(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.size(0), weight.size(2), device=x.device, dtype=x.dtype)
    for i, s, e in _groups(offs):
        torch.mm(x[s:e], weight[i], out=out[s:e])
    return out


class GroupedMM(torch.autograd.Function):
    """out[rows of expert i] = x[rows of expert i] @ weight[i]; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, offs):
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if want_w else None, weight if want_x else None, offs)
        ctx.shapes = (x.shape, weight.shape)
        return _forward(x, weight, offs)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offs = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = grad.new_zeros(ctx.shapes[0]) if want_x else None
        dw = grad.new_zeros(ctx.shapes[1]) if want_w else None
        for i, s, e in _groups(offs):
            if want_x:
                torch.mm(grad[s:e], weight[i].T, out=dx[s:e])
            if want_w:
                torch.mm(x[s:e].T, grad[s:e], out=dw[i])
        return dx, dw, None


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (rows sorted by expert, rows × in) times weight (experts × in × out), group by group; `offs`
    (experts,) holds each group's cumulative end row. The gradients computed are only those wanted."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[1] or offs.shape != weight.shape[:1]:
        raise ValueError(f"grouped_mm: expected x (rows, in), weight (experts, in, out), offs (experts,); got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(offs.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return GroupedMM.apply(x, weight, offs)
    return _forward(x, weight, offs)
