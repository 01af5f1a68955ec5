"""Halves sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): which they are, what the Function takes.

A half (F or G) that is, or contains, an FSDP2 unit holds its parameters as shards (DTensor) between
calls; each call all-gathers them (a pre-forward hook) and FSDP reduce-scatters their gradients when
the backward through that call reaches its inputs. So the reversible backward recomputes such a
half *through its module call* and back-propagates with `torch.autograd.backward`, which
accumulates into the gathered parameters' `.grad` where FSDP's hooks find them
(`meft_fx.runtime.replay`). Their gradients are FSDP's to reduce, not the Function's to return:
the Function takes a sharded half's parameters out of its inputs, and takes `GRAD_TRIGGER` in
their place so that its backward still runs when nothing else needs a gradient. A sharded half runs
whole, never in chunks of tokens (`meft_fx.runtime.chunks`): FSDP treats a second call of a unit in one
backward as an activation checkpoint's recompute and would not reduce its gradients.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["is_unit", "is_sharded", "GRAD_TRIGGER", "split_trainable", "gathered", "gathering"]

#: A leaf that requires grad, passed to the Function when sharded halves hold its only trainable parameters
#: (its gradient is None: it only makes autograd call the backward).
GRAD_TRIGGER = torch.zeros((), requires_grad=True)


_FSDP_MODULE: list = []


def _fsdp_module_type():
    if not _FSDP_MODULE:
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FSDPModule
            _FSDP_MODULE.append(FSDPModule)
        else:
            _FSDP_MODULE.append(None)
    return _FSDP_MODULE[0]


def is_unit(module: nn.Module) -> bool:
    """True when `module` itself was passed to FSDP2's `fully_shard`."""
    kind = _fsdp_module_type()
    return kind is not None and isinstance(module, kind)


def is_sharded(module: nn.Module) -> bool:
    """True when `module` or a module inside it was passed to FSDP2's `fully_shard`."""
    kind = _fsdp_module_type()
    return kind is not None and any(isinstance(m, kind) for m in module.modules())


def split_trainable(couplings) -> tuple[list, bool]:
    """(the trainable parameters of the unsharded halves, whether a sharded half has trainable parameters)."""
    params, sharded = {}, False  # by id: a half shared by several couplings (ALBERT) gives its parameters once
    for c in couplings:
        for half in (c.F, c.G):
            trainable = [p for p in half.parameters() if p.requires_grad]
            if trainable and is_sharded(half):
                sharded = True
            else:
                params.update((id(p), p) for p in trainable)
    return list(params.values()), sharded


@contextlib.contextmanager
def gathered(halves):
    """Those of `halves` that are FSDP2 units hold their whole weights inside the block (resharded after)."""
    units = [h for h in halves if is_unit(h)]
    try:
        for u in units:
            u.unshard()
        yield
    finally:
        for u in units:
            u.reshard()


def gathering(program, halves):
    """`program` run with those of `halves` that are FSDP2 units gathered (and resharded after), for code that
    calls a copy of a half's graph, sharing its submodules, instead of the half itself (generation's cached
    attention): nothing else would gather their parameters. `program` itself when none is a unit."""
    if not any(is_unit(h) for h in halves):
        return program

    def run(*args):
        with gathered(halves):
            return program(*args)
    return run
