"""A gated activation `act(gate) * up` (SwiGLU, GEGLU) that keeps two tensors for its backward, not three.

Autograd through `silu(gate) * up` saves `gate` (for silu's backward), `silu(gate)` and `up` (for the
product's): three tensors of the FFN's intermediate width per token, the widest a gated FFN has.
`gated_act` saves `gate` and `up` and recomputes `act(gate)` in the backward, with the very kernels
autograd would run (`mul`, `silu_backward` / `gelu_backward`), so its output and gradients are the same
bits; the backward's own peak is one such tensor lower too. A reversible stack recomputes every FFN in
chunks of tokens; with a third less to keep per token, chunks can be larger (fewer passes over the
weights) in the same memory. The `gated_activation` pass puts it in place of the pattern.
"""
from __future__ import annotations

import torch

__all__ = ["gated_act", "GatedActivation", "ACTIVATIONS"]

aten = torch.ops.aten
#: kind → (forward, backward written into its `grad` argument: grad ∘ act'(gate)); "gelu_tanh" is GELU with
#: approximate="tanh".
ACTIVATIONS = {
    "silu": (aten.silu.default, lambda g, x: aten.silu_backward.grad_input(g, x, grad_input=g)),
    "gelu": (aten.gelu.default, lambda g, x: aten.gelu_backward.grad_input(g, x, grad_input=g)),
    "gelu_tanh": (lambda x: aten.gelu.default(x, approximate="tanh"),
                  lambda g, x: aten.gelu_backward.grad_input(g, x, approximate="tanh", grad_input=g)),
}


class GatedActivation(torch.autograd.Function):
    """act(gate) * up, saving (gate, up); see the module docstring."""

    @staticmethod
    def forward(ctx, gate, up, kind: str):
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return ACTIVATIONS[kind][0](gate) * up

    @staticmethod
    def backward(ctx, grad):
        """d_up = act(gate) ∘ grad and d_gate = act'(gate) ∘ (grad ∘ up), each written over its one temporary:
        gate, up, grad and two more tensors at most (autograd through the two ops: three more)."""
        gate, up = ctx.saved_tensors
        act, act_backward = ACTIVATIONS[ctx.kind]
        d_up = act(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        d_gate = act_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return d_gate, d_up, None


def gated_act(gate: torch.Tensor, up: torch.Tensor, kind: str = "silu") -> torch.Tensor:
    """`act(gate) * up` with act one of ACTIVATIONS ("silu", "gelu", "gelu_tanh"); same bits as the two
    ops, two saved tensors instead of three when a gradient is needed."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"gated_act: kind={kind!r}; expected one of {', '.join(map(repr, ACTIVATIONS))}")
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return ACTIVATIONS[kind][0](gate) * up
    return GatedActivation.apply(gate, up, kind)
