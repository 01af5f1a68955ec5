"""The structure of one call: where its tensors go, and everything else (the key of a captured variant)."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


class _Slot:
    """Marks where a tensor goes in a flattened call."""

    def __repr__(self) -> str:
        return "<tensor>"


SLOT = _Slot()


def _leaf_key(v):
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return ("v", v)
    return ("id", type(v).__name__, id(v))


class CallSpec:
    """The structure of one call `module(*args, **kwargs)`: where the tensors go, and everything else.

    Two calls with the same `key` run the same captured graph; the graph takes the tensors only.
    """

    def __init__(self, args: tuple, kwargs: dict):
        leaves, self.treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self.template = [SLOT if isinstance(x, torch.Tensor) else x for x in leaves]
        self.slots = [i for i, x in enumerate(self.template) if x is SLOT]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        self.key = CallSpec.key_of(self.treespec, leaves)
        self.names = [f"in_{i}" for i in range(len(tensors))]

    @staticmethod
    def key_of(treespec, leaves) -> tuple:
        return (str(treespec), tuple(("t", x.dim(), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else _leaf_key(x)
                                     for x in leaves))

    @staticmethod
    def flatten(args: tuple, kwargs: dict):
        """(tensors, key) of a call."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        return [x for x in leaves if isinstance(x, torch.Tensor)], CallSpec.key_of(spec, leaves)

    def unflatten(self, tensors) -> tuple[tuple, dict]:
        leaves = list(self.template)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.treespec)

    def describe(self) -> str:
        args, kwargs = pytree.tree_unflatten(list(self.template), self.treespec)
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return f"({', '.join(parts)})"
