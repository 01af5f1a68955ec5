"""`debug_node`: why one node of a captured graph is, or is not, part of a reversible coupling."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx
from torch import nn

from ..capture import capture, module_mode, normalize_inputs
from ..passes import find_residual_units, group_layers, run_pipeline
from ..passes.fx.dataflow import data_dag, output_node, region
from ..passes.fx.ops import is_add
from ..passes.fx.provenance import PROVENANCE_KEY, describe, module_paths
from .graphs import converted_modules


@dataclass
class NodeReport:
    """What the residual-stream analysis concluded about one node; `str()` explains it."""

    node: str
    graph: str = ""
    found: bool = False
    lines: list = field(default_factory=list)
    on_stream: bool | None = None
    fans_out: bool | None = None
    post_dominator: str | None = None
    unit: str | None = None
    coupling: int | None = None

    def __str__(self) -> str:
        head = f"node {self.node}" + (f" in graph {self.graph}" if self.graph else "")
        return "\n".join([head + ":"] + [f"  {line}" for line in self.lines])


def _analysis_graphs(model: nn.Module, example_inputs=None) -> list:
    """[(label, graph the analysis ran on, converted module or None)]."""
    convs = converted_modules(model)
    if convs:
        out = []
        for path, conv in convs:
            for k, gm in enumerate(conv.graph_modules):
                programs = getattr(gm, "meft_programs", {}) or {}
                src = programs.get("dropout_to_modules") or programs.get("captured")
                if src is not None:
                    label = f"{conv.owner or path or '<root>'}" + (f" variant{k}" if k else "") + " (dropout_to_modules)"
                    out.append((label, src, conv))
        return out
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        args, kwargs = normalize_inputs(model, example_inputs)
        with module_mode(model, True):
            gm, _ = capture(model, args, kwargs)
    gm = run_pipeline(gm, until="dropout_to_modules").gm
    return [(f"{type(model).__name__} (whole model, captured now)", gm, None)]


def debug_node(model: nn.Module, node: str, example_inputs=None) -> NodeReport:
    """Explain why the node named `node` is, or is not, part of a reversible coupling.

    Re-runs `find_residual_units` (and `group_layers`) on the graph the analysis saw
    (after `dropout_to_modules`; node names as printed by `graphs()`). For a converted model the
    graphs of its converted modules are searched; any other module is captured first (pass
    `example_inputs` unless it is a transformers model). The report says whether the node carries
    data to the output, whether it fans out (a residual unit starts at a value used twice), its
    immediate post-dominator (where all its uses reconverge: a residual add for a unit entry),
    whether it is on the residual stream, which unit/layer/coupling it belongs to, and the
    analysis' rejection reasons that name it.
    """
    cands = _analysis_graphs(model, example_inputs)
    for label, gm, conv in cands:
        nodes = {n.name: n for n in gm.graph.nodes}
        if node not in nodes:
            continue
        return _NodeExplainer(label, gm, conv, nodes, node).report()
    return _not_found(node, cands)


def _not_found(node: str, cands: list) -> NodeReport:
    """The report for a node that is in none of the analysed graphs, with the closest names."""
    names = [n.name for _, gm, _ in cands for n in gm.graph.nodes]
    close = difflib.get_close_matches(node, names, n=6, cutoff=0.5)
    rep = NodeReport(node=node, graph=", ".join(label for label, _, _ in cands))
    rep.lines.append("not found" + (f"; close names: {', '.join(close)}" if close else "") +
                     ". Node names are those printed by `python -m meft_fx inspect MODEL --graph dropout_to_modules`"
                     " (or `captured`).")
    return rep


class _NodeExplainer:
    """Writes the `NodeReport` of one node of one analysed graph, section by section."""

    def __init__(self, label: str, gm: fx.GraphModule, conv, nodes: dict, node: str):
        """Start the report of `node` (a key of `nodes`, the nodes of `gm` by name) in the graph `label`."""
        self.gm, self.conv, self.nodes, self.node = gm, conv, nodes, node
        self.n = nodes[node]
        self.rep = NodeReport(node=node, graph=label, found=True)
        self.lines = self.rep.lines
        self.owner = getattr(conv, "owner", "") if conv is not None else ""

    def full(self, path: str) -> str:
        """`path` as a module path of the whole model (under the converted module's owner)."""
        owner = self.owner
        return f"{owner}.{path}" if owner and path else (path or owner or "the model")

    def report(self) -> NodeReport:
        """Run the analysis and write every section of the report; return it."""
        self._describe_op()
        self.dag = data_dag(self.gm)
        self.raw = find_residual_units(self.gm)
        self.analysis = group_layers(self.raw)
        if self.n not in self.dag:
            self.lines.append("not analysed: it carries no tensor data to the output (a size, a flag, a parameter, or"
                              " dead code); only data nodes can be on the residual stream")
            self.rep.on_stream = False
            _mention(self.rep, self.analysis)
            return self.rep
        self.out = output_node(self.gm)
        self.ipdom = nx.immediate_dominators(self.dag.reverse(copy=False), self.out)
        self._fan_out()
        pd = self._post_dominator()
        self._residual_pattern(pd)
        self._stream_membership()
        coupling_of, layer_of = self._layer_entries()
        left_out = self._units(coupling_of, layer_of)
        if self.rep.coupling is None and not left_out:
            self.lines.append("rewritten: no — it is in no residual unit on a stream")
        _mention(self.rep, self.analysis, [u.module for u in left_out if u.module] + [u.add for u in left_out])
        return self.rep

    def _describe_op(self) -> None:
        """The node's op, its source module and the pass that made it."""
        n, L = self.n, self.lines
        L.append(f"op: {describe(n)}")
        src = module_paths(n)
        owner = self.owner
        L.append(f"source module: {(owner + '.' if owner else '') + src[-1] if src else '(none recorded)'}")
        by = n.meta.get(PROVENANCE_KEY)
        if by:
            L.append(f"made by pass: {by}")

    def _fan_out(self) -> None:
        """Whether the node has two or more data users (a residual unit starts at such a value)."""
        rep = self.rep
        users = list(self.dag.successors(self.n))
        rep.fans_out = len(users) >= 2
        self.lines.append(f"fans out: {'yes' if rep.fans_out else 'no'} ({len(users)} data user(s): "
                          f"{', '.join(u.name for u in users[:6])}{', ...' if len(users) > 6 else ''})")

    def _post_dominator(self):
        """Record and describe the node's immediate post-dominator; return it (or None)."""
        n, rep, L = self.n, self.rep, self.lines
        pd = self.ipdom.get(n)
        rep.post_dominator = pd.name if pd is not None and pd is not n and pd is not self.out else None
        if rep.post_dominator is None:
            L.append("immediate post-dominator: the graph output (its uses do not reconverge before the output)")
        else:
            L.append(f"immediate post-dominator: {pd.name} ({'an add' if is_add(pd) else 'not an add'}) — every path "
                     f"from {self.node} to the output goes through it")
        return pd

    def _residual_pattern(self, pd) -> None:
        """Whether the node is the x of a residual x + f(x) that reconverges at its post-dominator `pd`."""
        n, node, rep, L = self.n, self.node, self.rep, self.lines
        if not rep.fans_out:
            L.append("residual pattern x + f(x): no — a unit's entry must be used at least twice (skip and branch)")
        elif rep.post_dominator is None or not is_add(pd):
            L.append(f"residual pattern x + f(x): no — its uses reconverge at {rep.post_dominator or 'the output'}, not at an add")
        elif n not in pd.args[:2]:
            L.append(f"residual pattern x + f(x): no — {pd.name} does not add {node} itself")
        else:
            other = pd.args[1] if pd.args[0] is n else pd.args[0]
            dep = isinstance(other, fx.Node) and other in self.dag and nx.has_path(self.dag, n, other)
            L.append(f"residual pattern x + f(x): {'yes' if dep else 'no'} — {pd.name} adds {node} to "
                     f"{getattr(other, 'name', other)}, which {'is' if dep else 'is not'} computed from it")

    def _stream_membership(self) -> None:
        """Whether the node is a stream state of a stack: on the post-dominator chain from its input to its output."""
        n, nodes, rep, L = self.n, self.nodes, self.rep, self.lines
        rep.on_stream = False
        for stack in self.raw.stacks:
            s, e = nodes[stack.start], nodes[stack.end]
            chain, cur, steps = {s}, s, 0
            while cur is not e and cur is not None and steps < len(nodes):
                cur = self.ipdom.get(cur)
                chain.add(cur)
                steps += 1
            if n in chain:
                rep.on_stream = True
                L.append(f"on the residual stream: yes — a stream state of the stack in {self.full(stack.owner)} "
                         f"(from {stack.start} to {stack.end}): every path from the stack's input to its output goes"
                         " through it")
        if not rep.on_stream:
            L.append("on the residual stream: no" + ("" if self.raw.stacks else " (no stack was found in this graph)"))

    def _layer_entries(self) -> tuple:
        """({id(unit): coupling index}, {id(unit): layer}) of every grouped unit; notes a layer the node enters."""
        rep, L = self.rep, self.lines
        coupling_of, layer_of, ci = {}, {}, 0
        for stack in self.analysis.stacks:
            for li, layer in enumerate(stack.layers):
                for u in layer.units:
                    coupling_of[id(u)], layer_of[id(u)] = ci + li, layer
                if self.n.name == layer.start:
                    L.append(f"stream state entering layer {self.full(layer.module)}: the input of coupling {ci + li}")
                    rep.coupling = ci + li if rep.coupling is None else rep.coupling
            ci += len(stack.layers)
        return coupling_of, layer_of

    def _units(self, coupling_of: dict, layer_of: dict) -> list:
        """Describe each residual unit the node is inside and whether it was rewritten; return those left out."""
        n, nodes, rep, L = self.n, self.nodes, self.rep, self.lines
        left_out = []
        for stack in self.raw.stacks:
            for u in stack.units:
                entry = nodes[u.entry or u.start]
                if n is entry or n not in region(self.dag, entry, nodes[u.end]):
                    continue
                uname = self.full(u.module) if (u.module or self.owner) else "in the root module"
                rep.unit = f"{u.kind} unit {uname} ({entry.name} → {u.add}" + \
                           (f" → {u.end}" if u.end != u.add else "") + ")"
                where = "residual add" if n.name == u.add else "end (the stream state it writes)" \
                    if n.name == u.end else "branch"
                if id(u) in coupling_of:
                    c, half = coupling_of[id(u)], _half(self.conv, u)
                    rep.coupling = c
                    L.append(f"belongs to: {rep.unit}, its {where}; layer {self.full(layer_of[id(u)].module)}")
                    L.append(f"rewritten: yes — computed by coupling {c}" + (f"'s {half}" if half else ""))
                else:
                    L.append(f"belongs to: {rep.unit}, its {where}")
                    L.append("rewritten: no — group_layers left this unit out (a layer is attention unit(s) then one FFN unit)")
                    left_out.append(u)
        return left_out


def _half(conv, unit) -> str:
    """"F" or "G": which half of its coupling computes `unit` under the converted module's method."""
    if conv is None:
        return ""
    spec = conv.config.spec
    return next((h for h, role in (("F", spec.F), ("G", spec.G)) if role in ("layer", unit.kind)), "")


def _mention(rep: NodeReport, analysis, also=()) -> None:
    """Add the analysis' rejection reasons that name the node (or one of `also`: unit modules, adds)."""
    words = [rep.node, *also]
    pat = re.compile("|".join(rf"(?<![\w.]){re.escape(w)}(?![\w.])" for w in words))
    said = [r for r in analysis.rejected if pat.search(r)]
    for r in said:
        rep.lines.append(f"analysis says: {r}")
