"""The bottleneck adapter of the MEFT paper's code: Linear(d→r) → act → dropout → Linear(r→d)."""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_PREFIX = "meft_adapter"
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Adapter(nn.Module):
    """Bottleneck adapter; weights N(0, init_std), biases 0 (as in the paper's code).

    Every parameter of an adapter lives under a module whose name starts with `meft_adapter`, so
    adapter weights are easy to find in a state dict.
    """

    def __init__(self, dim: int, rank: int, activation: str = "relu", dropout: float = 0.1,
                 init_std: float = 0.02, dtype=None, device=None):
        super().__init__()
        if rank > dim:
            raise ValueError(f"MEFTConfig.adapter_rank={rank} exceeds the hidden size {dim} it adapts: a bottleneck "
                             f"adapter needs rank ≤ {dim} (the paper uses 8 for BERT-size models)")
        self.down = nn.Linear(dim, rank, dtype=dtype, device=device)
        self.act = _ACTS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(rank, dim, dtype=dtype, device=device)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, 0.0, init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, *context) -> torch.Tensor:
        """`context` is accepted (and ignored) so an adapter can stand alone as F or G."""
        h = self.act(self.down(x))
        return self.up(self.dropout(h) if self.training else h)


class AdapterOnly(nn.Module):
    """F or G made of an adapter alone (MEFT1's G, MEFT2's F)."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        self.meft_adapter = adapter

    def forward(self, x, *context):
        return self.meft_adapter(x)


class NoUpdate(nn.Module):
    """F or G that adds nothing: a top half whose stream never reaches the stack's output (MEFT1's last G)."""

    def forward(self, x, *context):
        return torch.zeros_like(x)
