"""One MEFT coupling: two blocks F and G on two streams (Liao, Tan & Monz, NeurIPS 2023).

    forward:  y1 = λ·x1 + F(x2)              inverse:  x2 = (y2 − G(y1)) / β
              y2 = β·x2 + G(y1)                        x1 = (y1 − F(x2)) / λ
              (MEFT1/2 then swap the streams)

Leak compensation (`compensate_f` / `compensate_g`, on for the pretrained halves by default): a
pretrained half's skip connection keeps 1 − λ of its input, F'(x) = F(x) − λ·x, so

    y1 = λ·(x1 − x2) + F(x2)                 x1 = (y1 − F(x2)) / λ + x2
    y2 = β·(x2 − y1) + G(y1)                 x2 = (y2 − G(y1)) / β + y1

The stream carrying the pretrained chain then gains λ times the two streams' *difference* (at the
start, one sub-block's output) instead of λ times a whole stream — what keeps a deep pre-norm
decoder at its pretrained output (DESIGN.md §2b). It is still a coupling: F' reads only x2.

In which arithmetic these run — float, as written, or fixed point, where the inverse is exact —
is the stack's (`meft_fx.runtime.arithmetic`). What runs is generated: `Coupling.program` emits
the forward, inverse and backward programs (`meft_fx.runtime.codegen`) and caches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.fx as fx
from torch import nn

from .arithmetic import FloatStreams, StreamArithmetic
from .chunks import ChunkPlan, run_in_chunks
from .codegen import coupling_program, equation

__all__ = ["Coupling", "CouplingRecord"]

_FLOAT = FloatStreams()


@dataclass(frozen=True)
class CouplingRecord:
    """Where a coupling came from: its source layer and the source blocks of F and G.

    `F`/`G` are tuples of (source module path, kind), kind "attention", "ffn" or "adapter"
    (an adapter standing alone; "none (...)" as path: a half that adds nothing).
    """

    layer: str = ""
    F: tuple = ()
    G: tuple = ()


class Coupling(nn.Module):
    """y1 = λ·x1 + F(x2); y2 = β·x2 + G(y1); optionally swap. F and G take (stream, *their context).

    `compensate_f` / `compensate_g`: the half is leak-compensated (F − λ·x in place of F, see the module
    docstring). `f_context`/`g_context` are the positions, in the stack's context, of what F and G read.
    `chunks`: {"F" or "G": ChunkPlan} for a position-wise half, run in chunks of tokens (its context, if any,
    must be the same for every token: each chunk takes it whole).
    Calling the module runs the float equations (`forward`); the stack runs `program(...)`.
    """

    def __init__(self, F: nn.Module, G: nn.Module, lam: float, beta: float, swap: bool,
                 f_context: Sequence[int] = (), g_context: Sequence[int] = (), record: CouplingRecord | None = None,
                 chunks: dict | None = None, compensate_f: bool = False, compensate_g: bool = False):
        super().__init__()
        _FLOAT.check_scale(lam, "λ")
        _FLOAT.check_scale(beta, "β")
        self.F, self.G = F, G
        self.lam, self.beta, self.swap = float(lam), float(beta), bool(swap)
        self.compensate_f, self.compensate_g = bool(compensate_f), bool(compensate_g)
        self.f_context, self.g_context = tuple(f_context), tuple(g_context)
        self.record = record or CouplingRecord()
        # {"F"/"G": ChunkPlan} for position-wise halves; the context such a half reads is the same for every
        # token (e.g. a norm's weight), and every chunk gets it whole
        self.chunks = dict(chunks or {})
        for half, plan in self.chunks.items():
            if half not in ("F", "G") or not isinstance(plan, ChunkPlan):
                raise ValueError(f"chunks: expected {{'F' or 'G': ChunkPlan}}, got {half!r}: {plan!r}")
        self.__dict__["_programs"] = {}

    def f(self, x2, context):
        """F(x2) as every program calls it (in chunks of tokens when `chunks` has F)."""
        ctx = [context[i] for i in self.f_context]
        return run_in_chunks(self.F, x2, self.chunks["F"], *ctx) if "F" in self.chunks else self.F(x2, *ctx)

    def g(self, y1, context):
        """G(y1) as every program calls it (in chunks of tokens when `chunks` has G)."""
        ctx = [context[i] for i in self.g_context]
        return run_in_chunks(self.G, y1, self.chunks["G"], *ctx) if "G" in self.chunks else self.G(y1, *ctx)

    def equation(self, half: str) -> str:
        """The update equation of `half` ("F" or "G") as printed in programs and errors."""
        return equation(self, half)

    def forward(self, x1, x2, context=()):
        """(y1, y2) of the float equations (streams swapped like the stack swaps them)."""
        return tuple(self.program("forward", _FLOAT, len(context))(x1, x2, None, *context)[:2])

    def program(self, which: str, arith: StreamArithmetic, num_context: int, dtype=None) -> fx.GraphModule:
        """The generated `which` program ("forward", "inverse", "backward") for `arith`, cached.

        Regenerated when λ, β, swap, F or G changed since (they are plain attributes).
        """
        key = (which, arith.key, num_context, dtype, self.lam, self.beta, self.swap, self.compensate_f,
               self.compensate_g, tuple(sorted(self.chunks.items())))
        prog = self._programs.get(key)
        if prog is None or prog.F is not self.F or prog.G is not self.G:
            prog = self._programs[key] = coupling_program(self, which, arith, num_context, dtype)
        return prog

