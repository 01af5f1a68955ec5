"""Find the residual stream: the chains of `x + branch(x)` sub-blocks that every path goes through.

Structural, with no per-architecture tables. In the data-flow DAG restricted to what reaches the
output, a node `s` that fans out and whose immediate *post*-dominator is `add(s, b)` is the entry of
a residual unit: every path from `s` reconverges at that add. Units are linked into stacks by
following post-dominators from one unit's add to the next unit's entry; what lies between (a
post-norm, nothing for pre-norm) is glue and belongs to the preceding unit. Inputs of a unit that
do not depend on its entry (masks, rotary tables, encoder states) are context.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from ..fx.dataflow import data_dag, output_node, region, tensor_shape, topo
from ..fx.ops import INPLACE_ADD_TARGETS, attention_nodes, is_add, is_layout_only, is_random, is_shape_only
from ..fx.provenance import common_module, describe, module_parts
from .records import ResidualUnit, Stack, StreamAnalysis

PASS = "find_residual_units"
MAX_GLUE_STEPS = 16
MAX_GLUE_NODES = 48


def _signature(gm, nodes) -> tuple:
    return tuple(str(n.target) if n.op != "call_module" else type(gm.get_submodule(n.target)).__name__ for n in topo(gm, nodes))


def find_residual_units(gm: fx.GraphModule) -> StreamAnalysis:
    """Return the stacks of residual units in `gm` (not modified) and why other candidates were not."""
    dag = data_dag(gm)
    out = output_node(gm)
    ipdom = nx.immediate_dominators(dag.reverse(copy=False), out)
    rejected: list[str] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units, fanouts, examples = _candidate_units(gm, dag, out, ipdom, order, rejected, attention_nodes(gm))
    if not units:
        rejected.append(_no_residual_reason(fanouts, examples))
        return StreamAnalysis(stacks=[], rejected=rejected)
    stacks = _Stream(gm, dag, out, ipdom, units, rejected).stacks(order)
    _reject_off_stream(units, stacks, rejected)
    return StreamAnalysis(stacks=stacks, rejected=rejected)


# ----------------------------------------------------------------------------- candidate units

def _candidate_units(gm, dag, out, ipdom, order, rejected, mixing) -> tuple[list, int, list]:
    """(residual units, number of fan-outs, a few reconvergence notes) over every fan-out of the DAG."""
    units: list[ResidualUnit] = []
    fanouts = 0
    examples: list[str] = []   # a few fan-outs and where they reconverge, for the error message
    for s in sorted(dag.nodes, key=order.__getitem__):
        if s is out or dag.out_degree(s) < 2:
            continue
        fanouts += 1
        e = ipdom.get(s)
        if len(examples) < 3:
            examples.append(_reconvergence_note(s, e, out))
        unit = _unit_at(gm, dag, s, e, out, rejected, mixing)
        if unit is not None:
            units.append(unit)
    return units, fanouts, examples


def _reconvergence_note(s, e, out) -> str:
    """Where the fan-out `s` reconverges (its immediate post-dominator `e`), for the error message."""
    return f"{s.name} reconverges at " + ("the output" if e is None or e is out or e is s else
                                          f"{e.name}{'' if is_add(e) else ' (not an add)'}")


def _unit_at(gm, dag, s, e, out, rejected, mixing) -> ResidualUnit | None:
    """The residual unit entered at `s` and closed by its post-dominator `e`, or None when there is none.

    `e` adds `s` to a branch computed from it: `s + b`, or `(s + a) + b` (a parallel layer written
    x + attn(x) + mlp(x)). Its kind: "attention" when the branch mixes positions (a node of `mixing`),
    "ffn" when it is position-wise, "parallel" when it is a sum of both, each computed from `s`.
    """
    if e is None or e is s or e is out or not is_add(e):
        return None
    operands = list(e.args[:2])
    holds_s = [a is s or (isinstance(a, fx.Node) and is_add(a) and s in _sum_terms(gm, dag, s, a)) for a in operands]
    if holds_s.count(True) != 1:
        return None
    other = operands[holds_s.index(False)]
    if not isinstance(other, fx.Node) or other not in dag or not nx.has_path(dag, s, other):
        rejected.append(f"[{PASS}] {describe(e)}: adds {s.name} to a value that does not depend on it (not a residual)")
        return None
    body = region(dag, s, e)
    terms = [t for t in _sum_terms(gm, dag, s, e) if t is not s]
    parallel = _position_wise_term(dag, s, terms, mixing)
    kind = "parallel" if parallel is not None else "attention" if body & mixing else "ffn"
    module = common_module(body - {e})
    return ResidualUnit(start=s.name, add=e.name, end=e.name, branch_out=other.name, kind=kind,
                        module=module, size=len(body), parts=module_parts(topo(gm, body - {e}), module),
                        position_wise=parallel.name if parallel is not None else "")


def _sum_terms(gm, dag, s, node) -> list:
    """The terms `node` sums, through adds of two values computed from `s` (or `s` itself) and through
    dropout/reshapes of such a sum (Falcon: dropout(mlp_out += attn_out))."""
    terms, todo = [], [node]
    while todo:
        n = todo.pop()
        parts = [a for a in n.all_input_nodes if a in dag and nx.has_path(dag, s, a)] if n is not s else []
        if (is_add(n) or n.target in INPLACE_ADD_TARGETS) and len(parts) == 2:
            todo.extend(parts)
        elif n is not node and len(parts) == 1 and (is_shape_only(n) or is_random(gm, n)):
            todo.extend(parts)
        else:
            terms.append(n)
    return terms


def _position_wise_term(dag, s, terms, mixing):
    """Among a branch's terms computed from `s` (a parallel layer's attn(x) and mlp(x)), one that does
    not mix positions, when another does; else None (a plain attention or FFN branch)."""
    mixes = {t: bool(region(dag, s, t) & mixing) for t in terms}
    if len(terms) < 2 or all(mixes.values()) or not any(mixes.values()):
        return None
    return next(t for t in terms if not mixes[t])


def _no_residual_reason(fanouts: int, examples: list) -> str:
    """The rejection message when no fan-out is closed by a residual add."""
    if fanouts:
        seen = f" ({'; '.join(examples)}{'; ...' if fanouts > len(examples) else ''})"
        found = f"none of the {fanouts} values used more than once{seen} is re-joined by an add of itself and a " \
                f"branch computed from it (x + f(x))"
    else:
        found = "no value is used more than once, so none can be the x of a residual x + f(x)"
    return (f"[{PASS}] no residual connection found: {found}; a transformer layer has one per sub-block. What to do: "
            f"convert a model whose layers add their input back (x + f(x)); if yours does, make sure the add is traced "
            f"as an add of that same tensor (not an in-place update through another reference)")


def _reject_off_stream(units, stacks, rejected) -> None:
    """Record the units that ended up in no stack (nested inside another unit's branch)."""
    # Nested units (inside another unit's branch) are not on any stream.
    on_stream = {id(u) for st in stacks for u in st.units}
    for u in units:
        if id(u) not in on_stream:
            rejected.append(f"[{PASS}] residual unit at {u.add} ({u.module or '?'}) is not on a stream; not rewritten")


# ----------------------------------------------------------------------------- linking units into stacks

class _Stream:
    """Links residual units into stacks along the post-dominator tree; holds the state shared by the steps."""

    def __init__(self, gm, dag, out, ipdom, units, rejected):
        self.gm, self.dag, self.out, self.ipdom = gm, dag, out, ipdom
        self.units, self.rejected = units, rejected
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.by_start = {u.start: u for u in units}
        self.unit_nodes = {}
        for u in units:
            for n in region(dag, self.nodes[u.start], self.nodes[u.add]):
                self.unit_nodes[n] = u
        self.links = {}
        for u in units:
            nxt = self._glue_to_next(u)
            if nxt is not None:
                self.links[u.start] = nxt

    def stacks(self, order) -> list:
        """Every stack, headed by a unit no other unit links to, sorted by graph order of its first unit."""
        targets = {v.start for v, _, _ in self.links.values()}
        stacks = []
        for u in self.units:
            if u.start in targets:
                continue  # not the head of a chain
            stack = self._stack_from(u)
            if stack is not None:
                stacks.append(stack)
        stacks.sort(key=lambda st: order[self.nodes[st.units[0].start]])
        return stacks

    def _glue_to_next(self, u):
        """Walk post-dominators from u's add to the next unit's entry; return (unit, glue nodes, steps)."""
        nodes, by_start = self.nodes, self.by_start
        n, steps = nodes[u.add], 0
        while n is not None and n is not self.out and steps <= MAX_GLUE_STEPS:
            if n.name in by_start and n.name != u.start:
                v = by_start[n.name]
                glue = region(self.dag, nodes[u.add], n) - {nodes[u.add]} if n is not nodes[u.add] else set()
                if any(self.unit_nodes.get(g) not in (None, u) for g in glue - {n}) or len(glue) > MAX_GLUE_NODES:
                    return None
                return v, glue, steps
            n = self.ipdom.get(n)
            steps += 1
        return None

    def _path(self, a, b):
        """Post-dominator chain from a to b, both included."""
        p = [a]
        while p[-1] is not b:
            p.append(self.ipdom[p[-1]])
        return p

    def _stack_from(self, u) -> Stack | None:
        """The stack headed by `u`, or None when its last unit cannot end in the stream's shape."""
        canon = _shape_key(self.nodes[u.start])
        u.entry = u.start
        chain, glue_sigs = self._chain_from(u, canon)
        self._absorb_trailing_glue(chain[-1], glue_sigs, canon)
        if not self._trim_to_stream_shape(chain, canon):
            return None
        all_nodes = set()
        for c in chain:
            body = region(self.dag, self.nodes[c.entry], self.nodes[c.end])
            c.size = len(body)
            c.post_norm = not all(is_layout_only(n) for n in region(self.dag, self.nodes[c.add], self.nodes[c.end])
                                  if n is not self.nodes[c.add])
            all_nodes |= body
        return Stack(units=chain, owner=common_module(all_nodes))

    def _chain_from(self, u, canon) -> tuple[list, list]:
        """Follow the links from `u`, setting each boundary; return (units, (kind, glue signature, steps) per link)."""
        chain, glue_sigs = [u], []
        while chain[-1].start in self.links:
            cur = chain[-1]
            v, glue, steps = self.links[cur.start]
            # The state between two units is the last node on the way with the stream's shape
            # (reshapes such as OPT's flattening for the FFN go with the unit that needs them).
            boundary = [p for p in self._path(self.nodes[cur.add], self.nodes[v.start]) if _shape_key(p) == canon]
            if not boundary or v in chain:
                break
            cur.end = v.entry = boundary[-1].name
            glue_sigs.append((cur.kind, _signature(self.gm, glue), steps))
            chain.append(v)
        return chain, glue_sigs

    def _absorb_trailing_glue(self, last, glue_sigs, canon) -> None:
        """Extend `last.end` over a trailing post-norm like the one after the previous unit of its kind."""
        # A trailing post-norm belongs to the last unit when the glue after the previous unit of the
        # same kind is the same (post-norm: a norm after every unit; pre-norm: nothing between units).
        same = [(sig, steps) for kind, sig, steps in glue_sigs if kind == last.kind]
        if not (same and same[-1][0]):
            return
        sig, steps = same[-1]
        n = self._walk_up(self.nodes[last.add], steps)
        if n is None or n is self.out:
            return
        glue = region(self.dag, self.nodes[last.add], n) - {self.nodes[last.add]}
        if _signature(self.gm, glue) == sig and not any(g in self.unit_nodes for g in glue):
            canonical = [p for p in self._path(self.nodes[last.add], n) if _shape_key(p) == canon]
            if canonical:
                last.end = canonical[-1].name

    def _walk_up(self, n, steps):
        """Follow up to `steps` post-dominators from `n`, stopping at None or the output."""
        for _ in range(steps):
            n = self.ipdom.get(n)
            if n is None or n is self.out:
                break
        return n

    def _trim_to_stream_shape(self, chain, canon) -> bool:
        """Drop trailing units that end in another shape than the stream; False when the head itself does."""
        last = chain[-1]
        while _shape_key(self.nodes[last.end]) != canon and len(chain) > 1:
            self.rejected.append(f"[{PASS}] residual unit at {last.add} ends in a value of another shape than the "
                                 f"stream; not rewritten")
            chain.pop()
            last = chain[-1]
        return _shape_key(self.nodes[last.end]) == canon


def _shape_key(node) -> tuple | None:
    shape = tensor_shape(node)
    return None if shape is None else tuple(str(d) for d in shape)
