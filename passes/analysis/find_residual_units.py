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
from ..fx.ops import is_add, is_attention
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
    units: list[ResidualUnit] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fanouts = 0
    examples: list[str] = []   # a few fan-outs and where they reconverge, for the error message
    for s in sorted(dag.nodes, key=order.__getitem__):
        if s is out or dag.out_degree(s) < 2:
            continue
        fanouts += 1
        e = ipdom.get(s)
        if len(examples) < 3:
            examples.append(f"{s.name} reconverges at " + ("the output" if e is None or e is out or e is s else
                                                           f"{e.name}{'' if is_add(e) else ' (not an add)'}"))
        if e is None or e is s or e is out:
            continue
        if not is_add(e):
            continue
        operands = [a for a in e.args[:2]]
        if s not in operands:
            continue
        other = operands[1] if operands[0] is s else operands[0]
        if not isinstance(other, fx.Node) or other not in dag or not nx.has_path(dag, s, other):
            rejected.append(f"[{PASS}] {describe(e)}: adds {s.name} to a value that does not depend on it (not a residual)")
            continue
        body = region(dag, s, e)
        kind = "attention" if any(is_attention(gm, n) for n in body) else "ffn"
        module = common_module(body - {e})
        units.append(ResidualUnit(start=s.name, add=e.name, end=e.name, branch_out=other.name, kind=kind,
                                  module=module, size=len(body), parts=module_parts(topo(gm, body - {e}), module)))
    if not units:
        if fanouts:
            seen = f" ({'; '.join(examples)}{'; ...' if fanouts > len(examples) else ''})"
            found = f"none of the {fanouts} values used more than once{seen} is re-joined by an add of itself and a " \
                    f"branch computed from it (x + f(x))"
        else:
            found = "no value is used more than once, so none can be the x of a residual x + f(x)"
        rejected.append(
            f"[{PASS}] no residual connection found: {found}; a transformer layer has one per sub-block. What to do: "
            f"convert a model whose layers add their input back (x + f(x)); if yours does, make sure the add is traced "
            f"as an add of that same tensor (not an in-place update through another reference)")
        return StreamAnalysis(stacks=[], rejected=rejected)

    nodes = {n.name: n for n in gm.graph.nodes}
    by_start = {u.start: u for u in units}
    unit_nodes = {}
    for u in units:
        for n in region(dag, nodes[u.start], nodes[u.add]):
            unit_nodes[n] = u

    def glue_to_next(u):
        """Walk post-dominators from u's add to the next unit's entry; return (unit, glue nodes, steps)."""
        n, steps = nodes[u.add], 0
        while n is not None and n is not out and steps <= MAX_GLUE_STEPS:
            if n.name in by_start and n.name != u.start:
                v = by_start[n.name]
                glue = region(dag, nodes[u.add], n) - {nodes[u.add]} if n is not nodes[u.add] else set()
                if any(unit_nodes.get(g) not in (None, u) for g in glue - {n}) or len(glue) > MAX_GLUE_NODES:
                    return None
                return v, glue, steps
            n = ipdom.get(n)
            steps += 1
        return None

    links = {}
    for u in units:
        nxt = glue_to_next(u)
        if nxt is not None:
            links[u.start] = nxt
    targets = {v.start for v, _, _ in links.values()}
    def path(a, b):
        """Post-dominator chain from a to b, both included."""
        p = [a]
        while p[-1] is not b:
            p.append(ipdom[p[-1]])
        return p

    stacks = []
    for u in units:
        if u.start in targets:
            continue  # not the head of a chain
        canon = _shape_key(nodes[u.start])
        u.entry = u.start
        chain, glue_sigs = [u], []
        while chain[-1].start in links:
            cur = chain[-1]
            v, glue, steps = links[cur.start]
            # The state between two units is the last node on the way with the stream's shape
            # (reshapes such as OPT's flattening for the FFN go with the unit that needs them).
            boundary = [p for p in path(nodes[cur.add], nodes[v.start]) if _shape_key(p) == canon]
            if not boundary or v in chain:
                break
            cur.end = v.entry = boundary[-1].name
            glue_sigs.append((cur.kind, _signature(gm, glue), steps))
            chain.append(v)
        last = chain[-1]
        # A trailing post-norm belongs to the last unit when the glue after the previous unit of the
        # same kind is the same (post-norm: a norm after every unit; pre-norm: nothing between units).
        same = [(sig, steps) for kind, sig, steps in glue_sigs if kind == last.kind]
        if same and same[-1][0]:
            sig, steps = same[-1]
            n = nodes[last.add]
            for _ in range(steps):
                n = ipdom.get(n)
                if n is None or n is out:
                    break
            if n is not None and n is not out:
                glue = region(dag, nodes[last.add], n) - {nodes[last.add]}
                if _signature(gm, glue) == sig and not any(g in unit_nodes for g in glue):
                    canonical = [p for p in path(nodes[last.add], n) if _shape_key(p) == canon]
                    if canonical:
                        last.end = canonical[-1].name
        while _shape_key(nodes[last.end]) != canon and len(chain) > 1:
            rejected.append(f"[{PASS}] residual unit at {last.add} ends in a value of another shape than the stream; not rewritten")
            chain.pop()
            last = chain[-1]
        if _shape_key(nodes[last.end]) != canon:
            continue
        for c in chain:
            c.size = len(region(dag, nodes[c.entry], nodes[c.end]))
        all_nodes = set()
        for c in chain:
            all_nodes |= region(dag, nodes[c.entry], nodes[c.end])
        stacks.append(Stack(units=chain, owner=common_module(all_nodes)))
    stacks.sort(key=lambda st: order[nodes[st.units[0].start]])
    # Nested units (inside another unit's branch) are not on any stream.
    on_stream = {id(u) for st in stacks for u in st.units}
    for u in units:
        if id(u) not in on_stream:
            rejected.append(f"[{PASS}] residual unit at {u.add} ({u.module or '?'}) is not on a stream; not rewritten")
    return StreamAnalysis(stacks=stacks, rejected=rejected)


def _shape_key(node) -> tuple | None:
    shape = tensor_shape(node)
    return None if shape is None else tuple(str(d) for d in shape)
