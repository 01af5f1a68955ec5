"""`explain`: what a conversion rewrote, and why it left other regions alone."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .coupling import ReversibleStack


@dataclass
class CouplingInfo:
    """One reversible coupling: which source blocks became F and G, with its scales."""

    index: int
    stack: str              # module path of the ReversibleStack
    layer: str              # source module path of the transformer layer
    F: list                 # [(source module path, kind)], kind in attention / ffn / adapter
    G: list
    lam: float
    beta: float
    swap: bool
    numerics: str


@dataclass
class Explanation:
    """Report returned by `meft_fx.explain`. `str()` is a readable table."""

    couplings: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    method: str = ""

    def __str__(self) -> str:
        def blocks(bs):
            return " + ".join(f"{m or '?'} [{k}]" if k != "adapter" else "adapter" for m, k in bs)

        lines = [f"meft_fx: {len(self.couplings)} reversible coupling(s), method {self.method}"]
        rows = [("#", "layer", "F", "G", "λ", "β", "swap")]
        for c in self.couplings:
            rows.append((str(c.index), c.layer or "?", blocks(c.F) + " + adapter" * any(k != "adapter" for _, k in c.F),
                         blocks(c.G) + " + adapter" * any(k != "adapter" for _, k in c.G), f"{c.lam:g}", f"{c.beta:g}",
                         "yes" if c.swap else "no"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for j, r in enumerate(rows):
            lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.unmatched:
            lines.append("not rewritten:")
            lines.extend(f"  - {u}" for u in self.unmatched)
        return "\n".join(lines)


def explain(module: nn.Module) -> Explanation:
    """Describe the couplings in a module returned by `meft_fx.convert`.

    Raises ValueError if the module holds no reversible stack (was it converted?).
    """
    rep = Explanation(method=getattr(getattr(module, "meft_config", None), "method", ""))
    i = 0
    owners = {}
    for name, m in module.named_modules():
        if hasattr(m, "meft_unmatched"):
            rep.unmatched.extend(u for u in m.meft_unmatched if u not in rep.unmatched)
            owners[name] = getattr(m, "owner", "")
        if not isinstance(m, ReversibleStack):
            continue
        holder = max((k for k in owners if name.startswith(k + ".") or k == ""), key=len, default=None)
        prefix = owners.get(holder, "") if holder is not None else ""

        def full(path):
            return f"{prefix}.{path}" if prefix and path and path != "adapter" else (path or prefix)

        rep.method = rep.method or m.info.get("method", "")
        for c in m.couplings:
            rep.couplings.append(CouplingInfo(index=i, stack=name, layer=full(c.info.get("layer", "")),
                                              F=[(full(p), k) for p, k in c.info.get("F", [])],
                                              G=[(full(p), k) for p, k in c.info.get("G", [])], lam=c.lam, beta=c.beta, swap=c.swap,
                                              numerics=m.info.get("numerics", "float")))
            i += 1
    if not rep.couplings:
        raise ValueError(f"{type(module).__name__} has no reversible coupling; was it returned by meft_fx.convert?")
    return rep
