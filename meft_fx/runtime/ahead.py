"""The cotangent a block's output will receive, handed to the block before it runs.

The reversible backward recomputes a block and back-propagates a cotangent it already has. A part
of the block whose output reaches the block's output through additions only (a gated FFN, see
`meft_fx.nn.sliced_ffn`) receives exactly that cotangent, so it can back-propagate while it
recomputes. `cotangent_ahead(cot)` around the block's call offers it; `take_cotangent` takes it
(once) when the shapes agree. A taker must still check that the gradient arriving in its backward
is that cotangent: being offered one proves nothing about the graph.
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["cotangent_ahead", "take_cotangent"]

_AHEAD = threading.local()


@contextlib.contextmanager
def cotangent_ahead(cotangent: torch.Tensor | None):
    """While the block runs, `cotangent` is offered as the gradient its output will receive."""
    previous, _AHEAD.cot = getattr(_AHEAD, "cot", None), cotangent
    try:
        yield
    finally:
        _AHEAD.cot = previous


def take_cotangent(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The offered cotangent as (rows, width) of `dtype` when it has that many elements (None otherwise);
    taken once, so a second taker in the same block gets None."""
    cot = getattr(_AHEAD, "cot", None)
    if cot is None or cot.shape[-1] != width or cot.numel() != rows * width:
        return None
    _AHEAD.cot = None
    return cot.reshape(rows, width).to(dtype)
