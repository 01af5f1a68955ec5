"""The halves of a converted model as FSDP2 units: which they are, and how other captured graphs call them.

`meft_fx.shard` makes each coupling's F and G an FSDP2 unit. A converted module keeps a graph per call
structure (`ConvertedModule.graph_modules`); the halves of the others read the same parameters, and
`share_halves` makes them run through the first graph's units (which alone gather those parameters).
"""
from __future__ import annotations

from torch import nn

from .stack import stacks_in

__all__ = ["halves", "shared_halves", "half_class_names", "share_halves", "ThroughUnit"]


def halves(model: nn.Module) -> list[nn.Module]:
    """Every coupling's F and G in `model`'s reversible stacks, each module once, bottom to top."""
    found = {}
    for m in stacks_in(model):
        for c in m.couplings:
            found.setdefault(id(c.F), c.F)
            found.setdefault(id(c.G), c.G)
    return list(found.values())


def shared_halves(model: nn.Module) -> list[nn.Module]:
    """The halves that share a parameter with another half (one layer called N times, as in ALBERT)."""
    owner: dict = {}
    shared = {}
    for h in halves(model):
        for p in h.parameters():
            if id(p) in owner and owner[id(p)] is not h:
                shared[id(h)], shared[id(owner[id(p)])] = h, owner[id(p)]
            owner.setdefault(id(p), h)
    return list(shared.values())


def half_class_names(model: nn.Module) -> list[str]:
    """The class names of `model`'s halves (for an auto-wrap policy that matches modules by class name)."""
    return sorted({type(h).__name__ for h in halves(model)})


def share_halves(main: nn.Module, variant: nn.Module) -> None:
    """Make the couplings of `variant` (a graph captured for another call structure) run through `main`'s halves, the
    FSDP2 units: both read the same parameters, but only a unit gathers them and reduces their gradients. A half
    with the same code is replaced by main's; one captured otherwise (sizes specialised, other context) runs
    inside a call of main's unit (`ThroughUnit`)."""
    for ms, vs in zip(stacks_in(main), stacks_in(variant)):
        for mc, vc in zip(ms.couplings, vs.couplings):
            for name in ("F", "G"):
                m, v = getattr(mc, name), getattr(vc, name)
                if isinstance(v, ThroughUnit):
                    v = v.half
                if m is not v:
                    setattr(vc, name, m if _same_half(m, v) else ThroughUnit(v, m))


class ThroughUnit(nn.Module):
    """`half` (a variant's F or G) called inside a call of `unit` (the FSDP2 unit of the same layer's half): the
    unit's hooks gather the parameters both read, and reduce their gradients after the backward through the call,
    while `half`'s own code runs (`unit.forward` is `half.forward` for the duration of the call)."""

    def __init__(self, half: nn.Module, unit: nn.Module):
        super().__init__()
        self.unit = unit
        self.__dict__["half"] = half  # not a submodule: its parameters are the unit's

    def forward(self, *args):
        unit = self.unit
        unit.__dict__["forward"] = self.half.forward
        try:
            return unit(*args)
        finally:
            del unit.__dict__["forward"]


def _same_half(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return (getattr(a, "code", None) == getattr(b, "code", None) and len(pa) == len(pb)
            and all(x is y for x, y in zip(pa, pb)))
