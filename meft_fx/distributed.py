"""Several processes: FSDP2 over a converted model, the frozen base sharded per coupling half.

    torch.distributed.init_process_group("nccl")           # torchrun starts one process per GPU
    rev = meft_fx.convert(model)
    meft_fx.shard(rev)                                      # each F and G a unit, the rest the root
    rev(**batch).loss.backward()                            # adapter gradients reduce-scattered by FSDP

`shard` applies `torch.distributed.fsdp.fully_shard` to every coupling's F and to its G (each a unit
of its own, so only one half's weights are gathered at a time) and then to the model itself (the
embeddings, final norm and head). Frozen and trainable parameters share units: FSDP2 shards each
parameter on its own. How the reversible backward trains sharded halves:
`meft_fx.runtime.sharded`.

Accelerate and the HF Trainer apply FSDP2 from their config: a converted transformers model names its
halves in `_no_split_modules` (`meft_fx.runtime.units.half_class_names`), which their TRANSFORMER_BASED_WRAP policy wraps,
and a model `shard` already sharded is left as it is.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .conversion import ConvertedModule
from .runtime.units import halves, share_halves, shared_halves

__all__ = ["shard"]


def shard(model: nn.Module, mesh=None, *, mp_policy=None, reshard_after_forward: bool = True,
          offload_policy=None) -> nn.Module:
    """Shard a converted model across the processes of `mesh` with FSDP2 (`fully_shard`), in place.

    Args:
        model: what `meft_fx.convert` returned (not yet sharded).
        mesh: a 1-D `DeviceMesh` (default: FSDP's, all processes of the default group on their device).
        mp_policy: a `torch.distributed.fsdp.MixedPrecisionPolicy`; None: FSDP's default (no casting). Its
            param_dtype must be the frozen weights' dtype (the graphs were captured in it). Mixed precision:
            convert in bf16, make the adapters float32 (master weights), and pass
            `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`.
        reshard_after_forward, offload_policy: passed to every `fully_shard` call.

    Returns `model` (now an FSDP module). Each rank then holds 1/world of every parameter between
    calls; a half's whole weights exist only while it runs (forward, or its recompute in the backward).
    The loss and the adapters' gradients are those of one process over the whole batch (FSDP averages
    them; `tests/integration/test_fsdp.py`). Save with `meft_fx.save_adapters(model, folder)` on every rank
    (it gathers; rank 0 writes).

    Raises:
        RuntimeError: torch.distributed is not initialised (`init_process_group` first), or `model` is
            already sharded.
        ValueError: `model` has no reversible stack (convert it first), or mp_policy computes in a dtype
            the graphs were not captured in.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("meft_fx.shard: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first (torchrun sets up the environment)")
    from torch.distributed.fsdp import FSDPModule

    parts = halves(model)
    if not parts:
        raise ValueError("meft_fx.shard: model has no reversible stack; pass what meft_fx.convert(model) returned")
    shared = [type(h).__name__ for h in shared_halves(model)]
    if shared:
        raise ValueError(f"meft_fx.shard: {', '.join(sorted(set(shared)))} share parameters with other halves (one "
                         f"layer called N times, as in ALBERT); FSDP2 shards a parameter in one unit only, so such "
                         f"halves cannot be units of their own. Shard the whole model instead: fully_shard(model)")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise RuntimeError("meft_fx.shard: model is already sharded (fully_shard was applied to it or to a module "
                           "inside it); shard a freshly converted model once")
    _check_compute_dtype(model, mp_policy)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    convs = _converted(model)
    _fully_shard_units(model, parts, _holders(model, convs), kwargs)
    for conv in convs:
        conv.__dict__["_cache_plan"] = None  # made again on first use, from the sharded halves
        conv.__dict__["_sharded_halves"] = halves(conv.graph_module)
        for variant in conv.graph_modules[1:]:
            share_halves(conv.graph_module, variant)
    return model


def _fully_shard_units(model: nn.Module, parts: list, holders: dict, kwargs: dict) -> None:
    """`fully_shard` each half, then the model (the root: everything else), each with its parameters' holders."""
    from torch.distributed.fsdp import fully_shard

    half_params = {p for h in parts for p in h.parameters()}
    for half in parts:
        with _attached(half, list(half.parameters()), holders):
            fully_shard(half, **kwargs)
    with _attached(model, [p for p in model.parameters() if p not in half_params], holders):
        fully_shard(model, **kwargs)


def _holders(model: nn.Module, convs) -> dict:
    """{parameter: [modules outside `model`'s module tree that hold it]}: a converted module's original (kept for
    re-captures and generation), the graphs of its other call structures, generation's copies of halves."""
    in_tree = set(model.modules())
    roots = [m for conv in convs for m in [conv.original, *conv.graph_modules[1:], *_cache_copies(conv)]]
    found: dict = {}
    for root in roots:
        for m in root.modules():
            if m not in in_tree:
                for p in m._parameters.values():
                    if p is not None:
                        found.setdefault(p, []).append(m)
    return found


def _cache_copies(conv) -> list:
    plan = conv.__dict__.get("_cache_plan")
    return [b for pair in getattr(plan, "_blocks", ()) for b in pair]


@contextlib.contextmanager
def _attached(unit: nn.Module, params: list, holders: dict):
    """While `fully_shard(unit)` runs: the other modules that hold `unit`'s parameters are children of `unit`, so
    FSDP records them as sharing those parameters and swaps shards and gathered weights on them too (else they
    would keep the whole weights alive on every rank). A holder whose subtree holds other parameters is left out."""
    mine = set(params)
    extra = {id(m): m for p in params for m in holders.get(p, ())}
    extra = [m for m in extra.values() if all(q in mine for q in m.parameters())]
    names = [f"_meft_holder_{i}" for i in range(len(extra))]
    for name, m in zip(names, extra):
        unit._modules[name] = m
    try:
        yield
    finally:
        for name in names:
            del unit._modules[name]


def _check_compute_dtype(model: nn.Module, mp_policy) -> None:
    """The graphs were captured for the frozen weights' dtype (casts and checks in them name it): FSDP may not
    compute in another."""
    want = getattr(mp_policy, "param_dtype", None)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    if want is not None and frozen and frozen != {want}:
        raise ValueError(
            f"meft_fx.shard: mp_policy.param_dtype={want} but the frozen weights are {', '.join(map(str, frozen))}: "
            f"the converted graphs were captured in that dtype and cannot compute in another. For bf16 compute "
            f"with float32 adapters and gradient reduction, convert the model in bf16 "
            f"(meft_fx.convert(model.to(torch.bfloat16))), make the trainable parameters float32, and shard with "
            f"MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)")


def _converted(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, ConvertedModule)]


