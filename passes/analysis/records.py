"""The records the analysis passes produce: residual units, layers, stacks.

Records refer to nodes by name, so they stay valid across the graph copies each pass makes.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ResidualUnit:
    """One sub-block `out = norm?(start + branch(start))` on the residual stream."""

    start: str           # the node that fans out into skip and branch
    add: str             # the residual add
    end: str             # stream node leaving the unit (the add, or a trailing post-norm)
    branch_out: str      # the add's operand that is not the skip
    kind: str            # "attention" (mixes positions), "ffn" (position-wise) or "parallel" (x + attn(x) + ffn(x))
    module: str          # source module path shared by the branch's nodes ("" when unknown)
    size: int = 0        # number of nodes in the unit
    parts: tuple = ()    # child modules of `module` the branch runs through, in order
    entry: str = ""      # stream state entering the unit (start, or a node before a reshape to start)
    position_wise: str = ""  # "parallel" units: the branch's position-wise term (the FFN's output)
    post_norm: bool = False  # values change between `add` and `end` (a norm after the add; casts do not count)

    def label(self, within: str = "") -> str:
        """`module`, spelled out with its parts when it is the whole layer `within` (pre-norm blocks)."""
        if self.module == within and self.parts:
            parts = self.parts[0] if len(self.parts) == 1 else "{" + ",".join(self.parts) + "}"
            return f"{self.module}.{parts}" if self.module else parts
        return self.module


@dataclass
class Layer:
    """A transformer layer: one or more attention units followed by one FFN unit."""

    units: list

    @property
    def start(self) -> str:
        """The stream state entering the layer."""
        return self.units[0].entry or self.units[0].start

    @property
    def end(self) -> str:
        return self.units[-1].end

    @property
    def attention(self) -> list:
        return [u for u in self.units if u.kind == "attention"]

    @property
    def ffn(self) -> ResidualUnit:
        return self.units[-1]

    @property
    def module(self) -> str:
        from os.path import commonprefix

        mods = [u.module for u in self.units if u.module]
        if not mods:
            return ""
        parts = commonprefix([m.split(".") for m in mods])
        return ".".join(parts)


@dataclass
class Stack:
    """A chain of residual units linked along the stream; after grouping, also its layers."""

    units: list
    owner: str = ""                       # smallest source module containing every unit
    layers: list = field(default_factory=list)

    @property
    def start(self) -> str:
        return self.layers[0].start if self.layers else (self.units[0].entry or self.units[0].start)

    @property
    def end(self) -> str:
        return self.layers[-1].end if self.layers else self.units[-1].end


@dataclass
class StreamAnalysis:
    """Result of `find_residual_units`: the stacks found, and why other candidates were not used."""

    stacks: list
    rejected: list        # human-readable reasons

    def __bool__(self) -> bool:
        return bool(self.stacks)
