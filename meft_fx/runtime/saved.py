"""What the reversible Function keeps between forward and backward, and how its gradients add up.

Gradients that are known to be zero are None throughout (the stream a stack does not return,
a block whose output reaches nothing): `add_grads`, `scale_grad` and `cast_grad` pass None on.
"""
from __future__ import annotations

import math

import torch

__all__ = ["take", "save_context", "restore_context", "GradAccumulator", "add_grads", "scale_grad", "cast_grad",
           "output_grads", "coupling_input_grads", "leak_grad", "add_grads_into"]


def take(state: list, i: int):
    """state[i], leaving None in its place. A program called with a list it empties holds the only
    reference to each value, so the value is freed at its last use in the program (values passed
    as arguments stay alive in the caller's frame until the call returns)."""
    value, state[i] = state[i], None
    return value


def add_grads(a, b):
    """a + b where None stands for a gradient known to be zero."""
    return b if a is None else a if b is None else a + b


def add_grads_into(a, b):
    """a += b in place (a is the backward's own gradient, never autograd's); None stands for zero."""
    return b if a is None else a if b is None else a.add_(b)


def scale_grad(a, scale: float):
    """scale · a (None stays None; scale 1 is skipped)."""
    return None if a is None else (a if scale == 1.0 else a * scale)


def coupling_input_grads(wanted: bool, dy1, dy2, d_x2, lam: float, beta: float):
    """(dx1, dx2) = (λ·dy1, β·dy2 + d_x2) of a coupling's input streams; (None, None) when not `wanted`.

    With β a power of two, β·dy2 + d_x2 is one pass (`torch.add(..., alpha=β)`): the product is exact,
    so the fused multiply-add rounds as the separate steps do (the same bits as autograd's sum)."""
    if not wanted:
        return None, None
    if d_x2 is None or dy2 is None or math.frexp(beta)[0] != 0.5 or d_x2.dtype != dy2.dtype:
        return scale_grad(dy1, lam), add_grads(scale_grad(dy2, beta), d_x2)
    return scale_grad(dy1, lam), torch.add(d_x2, dy2, alpha=beta)


def leak_grad(d_in, d_out, scale: float, wanted: bool = True):
    """d_in − scale·d_out: the gradient of a leak-compensated half's input (F'(x) = F(x) − scale·x; d_in = Fᵀd_out),
    None when not `wanted`. One pass, `torch.add(..., alpha=−scale)`: with the scale a power of two the product is
    exact, so it rounds as autograd's sum of the two terms does."""
    if not wanted or d_out is None:
        return d_in if wanted else None
    if d_in is None:
        return d_out * -scale
    if math.frexp(scale)[0] != 0.5 or d_in.dtype != d_out.dtype:
        return d_in - d_out * scale
    return torch.add(d_in, d_out, alpha=-scale)


def cast_grad(a, dtype: torch.dtype):
    """a in `dtype` (None stays None)."""
    return None if a is None else a.to(dtype)


def output_grads(out_index, d_out):
    """(dy1, dy2) of a stack's top streams from the gradient of what it returned (`ReversibleStack.select`)."""
    if out_index == "mean":
        return d_out * 0.5, d_out * 0.5
    return (None, d_out) if out_index == 1 else (d_out, None)


class GradAccumulator:
    """Sums the gradients of parameters and context tensors over the couplings of one backward."""

    def __init__(self):
        self._grads: dict = {}

    def add(self, pairs) -> None:
        """Add each (tensor, gradient or None) pair."""
        for t, g in pairs:
            self._grads[t] = add_grads(self._grads.get(t), g)

    def get(self, t):
        """The summed gradient of `t` (None when nothing reached it)."""
        return self._grads.get(t) if isinstance(t, torch.Tensor) else None


def save_context(fctx, context) -> list:
    """Remember the non-tensor context on `fctx`; returns the tensors to `save_for_backward`."""
    fctx.n_ctx = len(context)
    fctx.tensor_pos = [i for i, v in enumerate(context) if isinstance(v, torch.Tensor)]
    fctx.other_context = {i: v for i, v in enumerate(context) if not isinstance(v, torch.Tensor)}
    return [context[i] for i in fctx.tensor_pos]


def restore_context(fctx, tensors) -> list:
    """The context list again, float tensors detached (keeping requires_grad) for the recompute."""
    context = [None] * fctx.n_ctx
    for i, v in fctx.other_context.items():
        context[i] = v
    for i, t in zip(fctx.tensor_pos, tensors):
        context[i] = t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t
    return context
