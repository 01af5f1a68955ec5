"""Look inside a converted model: every intermediate program, a networkx view, node diagnostics.

    for name, gm in meft_fx.graphs(rev).items():   # captured, each pass, final, per-coupling programs
        print(gm.code)                              # valid Python, headed "# made by pass ..."
    g = meft_fx.to_networkx(rev)                    # couplings as nodes, streams and context as edges
    print(meft_fx.inspect.debug_node(rev, "add_3"))  # why a node is (not) part of a coupling

Like lightning-thunder's `last_traces`, each program says which pass made it: the header comment,
`gm.meta["meft_pass"]`, and per node `node.meta["meft_pass"]` ("capture" for nodes the tracer
made). Lines of nodes a later pass added end in `# <- PASS`.
"""
from __future__ import annotations

import copy
import difflib
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .coupling import ReversibleStack

PROVENANCE = "meft_pass"
PASS_ORDER = ("hoist_shape_queries", "dropout_to_modules", "insert_adapters", "build_couplings")

# ----------------------------------------------------------------------------- converted modules


def converted_modules(model: nn.Module) -> list:
    """[(path, ConvertedModule)] in `model` (path "" when `model` itself was replaced)."""
    from .convert import ConvertedModule

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ConvertedModule)]


def _variants(conv) -> list:
    """The captured variants of a ConvertedModule, the first (main) one first."""
    main = conv.graph_module
    return [main] + [g for g in conv.__dict__.get("_variants", {}).values() if g is not main]


def _stack_calls(gm: fx.GraphModule) -> list:
    """[(call node, ReversibleStack)] in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            try:
                mod = gm.get_submodule(n.target)
            except AttributeError:
                continue
            if isinstance(mod, ReversibleStack):
                out.append((n, mod))
    return out


# ----------------------------------------------------------------------------- printable programs

def stack_call(model: nn.Module, inputs: dict):
    """(stack, x, context): the first `ReversibleStack` that `model(**inputs)` runs and the stream
    input and context tensors it is called with, from one eval-mode, no-grad forward (the model is
    left in eval mode). For running or inverting a stack's couplings by hand."""
    st = next((m for m in model.modules() if isinstance(m, ReversibleStack)), None)
    if st is None:
        raise ValueError(f"{type(model).__name__} has no ReversibleStack: call meft_fx.convert first")
    seen = {}
    h = st.register_forward_pre_hook(lambda m, a: seen.setdefault("args", a))
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    x, *context = seen["args"]
    return st, x, tuple(context)


def made_by(gm: fx.GraphModule) -> str:
    """The pass that made `gm` (from `gm.meta["meft_pass"]`)."""
    return (getattr(gm, "meta", None) or {}).get(PROVENANCE, "?")


_HEADED: dict = {}


def _headed_codegen(base, header: str):
    """A copy of the graph's code generator whose `def forward` is preceded by `header` comments."""
    cls = type(base)
    if cls not in _HEADED:
        def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
            d = cls.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)
            return self._meft_header + d

        _HEADED[cls] = type(f"Headed{cls.__name__}", (cls,), {"gen_fn_def": gen_fn_def})
    new = copy.copy(base)
    new.__class__ = _HEADED[cls]
    new._meft_header = "".join(f"# {line}\n" for line in header.splitlines())
    return new


def _marker(graph: fx.Graph, own: str):
    """Body transformer: end the line of each node that a later pass made with `# <- PASS`."""
    def provenance(n):
        return n.meta.get(PROVENANCE, "capture")

    def later(p):
        return p and not p.startswith("capture") and p != "codegen"

    def transform(body):
        nodes = list(graph.nodes)
        out, pending = [], None
        for piece in body:
            m = re.fullmatch(r"# COUNTER: (\d+)\n", piece)
            if m:
                n = nodes[int(m.group(1))] if int(m.group(1)) < len(nodes) else None
                pending = provenance(n) if n is not None and n.op not in ("placeholder", "output") else None
                pending = pending if later(pending) else None
                out.append(piece)
                continue
            if pending and piece.endswith("\n"):
                piece = f"{piece[:-1]}  # <- {pending}\n"
                pending = None
            out.append(piece)
        return out

    return transform


def _program(gm: fx.GraphModule, pass_name: str, name: str, note: str = "") -> fx.GraphModule:
    """A printable copy of `gm` (parameters shared): header comment, provenance on every node."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    for n in g.nodes:
        if n.op != "output":
            n.meta.setdefault(PROVENANCE, "capture")
    header = f"made by pass {pass_name}\ngraph {name}" + (f": {note}" if note else "")
    g._codegen = _headed_codegen(gm.graph._codegen, header)
    g._codegen._body_transformer = _marker(g, pass_name)
    prog = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    prog.meta = {PROVENANCE: pass_name, "meft_graph": name}
    return prog


def _trace_leaf(mod: nn.Module):
    """A GraphModule for F/G: itself, or a trace of a stand-alone adapter."""
    if isinstance(mod, fx.GraphModule):
        return mod
    try:
        return fx.symbolic_trace(mod)
    except Exception:  # noqa: BLE001 - not every module traces; it is then left out
        return None


def _exact_graph(c, which: str, stack, call):
    """The coupling's fixed-point program, F and G in the dtype of the stack's input (None if unavailable)."""
    from passes._graph import tensor_dtype

    dtype = tensor_dtype(call.args[0]) if isinstance(call.args[0], fx.Node) else None
    try:
        return c.graph(which, stack.num_context, dtype=dtype or torch.float32, frac_bits=stack.frac_bits)
    except (TypeError, ValueError, AttributeError):
        return None


def graphs(model: nn.Module) -> "OrderedDict[str, fx.GraphModule]":
    """Every program of a converted model, in pipeline order: name → `torch.fx.GraphModule`.

    Per converted module (names prefixed with its owner path and "/" when the model has several;
    further captured call structures, see `ConvertedModule.variants`, add "variantK/"):

    - ``captured``: the graph the tracer produced;
    - one graph per pass, named after it: ``hoist_shape_queries``, ``dropout_to_modules``,
      ``insert_adapters``, ``build_couplings``;
    - ``final``: the program the converted module runs;
    - per coupling i (numbered as in `meft_fx.explain`): ``coupling{i}/forward`` and
      ``coupling{i}/inverse`` (the generated MEFT equations, F and G called as submodules), with
      exact numerics also ``coupling{i}/exact_forward`` and ``coupling{i}/exact_inverse`` (the
      int64 fixed-point programs), and ``coupling{i}/F``, ``coupling{i}/G`` (the sub-blocks cut
      out of the graph).

    Every value is a copy sharing the model's parameters, so it runs; its `.code` is valid Python
    whose first line is ``# made by pass NAME`` (also in ``gm.meta["meft_pass"]``), and code lines
    of nodes added by a later pass than capture end in ``# <- PASS``. There is no separate backward
    graph: the backward re-runs F and G through autograd (see `meft_fx.coupling`).
    """
    convs = converted_modules(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} holds no converted module; was it returned by meft_fx.convert?")
    out: OrderedDict = OrderedDict()
    base = 0
    for path, conv in convs:
        owner = "/".join([conv.owner or path or "<root>"])
        prefix = f"{owner}/" if len(convs) > 1 else ""
        n_main = 0
        for k, gm in enumerate(_variants(conv)):
            pre = prefix + (f"variant{k}/" if k else "")
            programs = getattr(gm, "meft_programs", {}) or {}
            last = "capture"
            for pname, prog in programs.items():
                by = made_by(prog)
                last = by
                out[pre + pname] = _program(prog, by, pre + pname)
            out[pre + "final"] = _program(gm, last, pre + "final", "the program the converted module runs")
            i = base
            for call, stack in _stack_calls(gm):
                exact = getattr(stack, "numerics", "float") == "exact"
                for c in stack.couplings:
                    for which in ("forward", "inverse"):
                        name = f"{pre}coupling{i}/{which}"
                        out[name] = _program(c.graph(which, stack.num_context), "codegen", name,
                                             f"MEFT {which} equations, λ={c.lam:g} β={c.beta:g}" + (", swap" if c.swap else ""))
                    if exact:  # the fixed-point programs the stack actually runs
                        for which in ("exact_forward", "exact_inverse"):
                            prog = _exact_graph(c, which, stack, call)
                            if prog is not None:
                                name = f"{pre}coupling{i}/{which}"
                                out[name] = _program(prog, "codegen", name, f"MEFT {which.replace('_', ' ')} equations on "
                                                     f"int64 fixed-point streams ({stack.frac_bits} fractional bits)")
                    for half in ("F", "G"):
                        sub = _trace_leaf(getattr(c, half))
                        if sub is not None:
                            name = f"{pre}coupling{i}/{half}"
                            by = made_by(sub) if made_by(sub) != "?" else "build_couplings"
                            out[name] = _program(sub, by, name, f"{half} of coupling {i}, called as (stream, *context)")
                    i += 1
            if k == 0:
                n_main = i - base
        base += n_main
    return out


def format_program(name: str, gm: fx.GraphModule) -> str:
    """`gm.code` headed by which pass made it (programs from `graphs()` already carry the header)."""
    code = gm.code.strip("\n").rstrip()
    if code.startswith("# made by pass"):
        return code + "\n"
    return f"# made by pass {made_by(gm)}\n# graph {name}\n{code}\n"


def show(gm: fx.GraphModule, name: str = "") -> None:
    """Print a program with its header (see `format_program`)."""
    print(format_program(name or (getattr(gm, "meta", None) or {}).get("meft_graph", type(gm).__name__), gm))


def find_graph(programs: dict, name: str):
    """Look a program up by exact name, then by a unique suffix (`coupling3/inverse` also finds
    `bert.encoder/coupling3/inverse`). Raises KeyError listing close names."""
    if name in programs:
        return name, programs[name]
    hits = [k for k in programs if k.endswith("/" + name)]
    if len(hits) == 1:
        return hits[0], programs[hits[0]]
    # an owner prefix on a single-module model: "bert.encoder/coupling3/inverse"
    tail = [k for k in programs if "/" in name and name.split("/", 1)[1] == k]
    if len(tail) == 1:
        return tail[0], programs[tail[0]]
    close = hits or difflib.get_close_matches(name, list(programs), n=5, cutoff=0.4)
    raise KeyError(f"no graph named {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                  f"; names: {', '.join(programs)}"))


# ----------------------------------------------------------------------------- networkx

def to_networkx(model: nn.Module, estimate_memory: bool = True) -> nx.DiGraph:
    """The rewritten program as a `networkx.DiGraph`, one node per coupling.

    Granularity: couplings, not ops (for the ops of a program use `graphs()` and
    `passes._graph.data_dag`). Nodes, each with a ``kind`` attribute:

    - ``"coupling{i}"`` (kind ``"coupling"``, i as in `meft_fx.explain`): ``index``, ``stack``
      (module path of its ReversibleStack), ``layer`` (source module path), ``F`` and ``G``
      (lists of (source module path, block kind) with kind attention / ffn / adapter),
      ``adapters`` ({"F": [...], "G": [...]} adapter module names), ``lam``, ``beta``, ``swap``,
      ``numerics``, ``activation_bytes_saved_per_token`` (None unless `estimate_memory`),
      ``f_context`` and ``g_context`` (names of the context inputs F and G read);
    - ``"{S}input"`` (kind ``"stream_input"``): the stream state entering the stack (h1 = h2 = it),
      with ``node`` (its name in the final graph), ``stack`` and ``owner`` (the source module
      that was replaced, e.g. "bert.encoder");
    - ``"{S}output"`` (kind ``"stream_output"``): what leaves the stack, ``stream`` = "h1", "h2"
      or "mean" (the stream that carries the pretrained chain, unless configured otherwise);
    - ``"{S}context/{name}"`` (kind ``"context"``): a value every layer reads unchanged (mask,
      sizes, rotary tables), ``node`` = its name in the final graph.

    ``{S}`` is "" for a model with one stack, else "stack{k}/". Edges: ``kind="stream"`` from the
    input through the couplings in order to the output, with ``streams`` = ("h1", "h2") (the pair
    flows; a coupling with ``swap`` exchanges them), and ``kind="context"`` from a context node to
    each coupling that reads it, with ``used_by`` = ("F",), ("G",) or ("F", "G"). Graph attributes:
    ``method``, ``numerics``, ``model`` (class name), ``num_couplings``.
    """
    from .explain import explain

    rep = explain(model, estimate_memory=estimate_memory)
    by_stack: OrderedDict = OrderedDict()
    for c in rep.couplings:
        by_stack.setdefault(c.stack, []).append(c)
    owners = {p: (c.owner or p) for p, c in converted_modules(model)}
    g = nx.DiGraph(method=rep.method, numerics="/".join(sorted({c.numerics for c in rep.couplings})),
                   model=type(model).__name__, num_couplings=len(rep.couplings))
    for k, (spath, infos) in enumerate(by_stack.items()):
        stack = model.get_submodule(spath)
        parent_path, _, child = spath.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        call = next((n for n, s in _stack_calls(parent) if n.target == child), None) if isinstance(parent, fx.GraphModule) else None
        names = [a.name if isinstance(a, fx.Node) else repr(a) for a in (call.args if call is not None else ())]
        ctx_names = names[1:] if names else [f"ctx_{j}" for j in range(stack.num_context)]
        pre = f"stack{k}/" if len(by_stack) > 1 else ""
        inp, outp = f"{pre}input", f"{pre}output"
        owner = max((p for p in owners if p == "" or spath.startswith(p + ".")), key=len, default=None)
        owner = owners.get(owner, "") if owner is not None else ""
        g.add_node(inp, kind="stream_input", stack=spath, owner=owner, node=names[0] if names else "",
                   label="h1 = h2 = input")
        for name in ctx_names:
            g.add_node(f"{pre}context/{name}", kind="context", stack=spath, node=name, label=name)
        prev = inp
        for c, info in zip(stack.couplings, infos):
            node = f"coupling{info.index}"
            g.add_node(node, kind="coupling", index=info.index, stack=spath, layer=info.layer, F=list(info.F), G=list(info.G),
                       adapters=dict(info.adapters), lam=info.lam, beta=info.beta, swap=info.swap, numerics=info.numerics,
                       activation_bytes_saved_per_token=info.activation_bytes_saved_per_token,
                       f_context=[ctx_names[j] for j in c.f_context], g_context=[ctx_names[j] for j in c.g_context])
            g.add_edge(prev, node, kind="stream", streams=("h1", "h2"))
            for j in sorted(set(c.f_context) | set(c.g_context)):
                used = tuple(h for h, idx in (("F", c.f_context), ("G", c.g_context)) if j in idx)
                g.add_edge(f"{pre}context/{ctx_names[j]}", node, kind="context", used_by=used)
            prev = node
        out_stream = {0: "h1", 1: "h2"}.get(stack.out_index, "mean")
        g.add_node(outp, kind="stream_output", stack=spath, owner=owner, stream=out_stream, label=f"output = {out_stream}")
        g.add_edge(prev, outp, kind="stream", streams=("h1", "h2") if out_stream == "mean" else (out_stream,))
    return g


# ----------------------------------------------------------------------------- why did a node (not) match

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
            for k, gm in enumerate(_variants(conv)):
                programs = getattr(gm, "meft_programs", {}) or {}
                src = programs.get("dropout_to_modules") or programs.get("captured")
                if src is not None:
                    label = f"{conv.owner or path or '<root>'}" + (f" variant{k}" if k else "") + " (dropout_to_modules)"
                    out.append((label, src, conv))
        return out
    import passes
    from .capture import capture, normalize_inputs

    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        args, kwargs = normalize_inputs(model, example_inputs)
        mode = model.training
        model.train()
        try:
            gm, _ = capture(model, args, kwargs)
        finally:
            model.train(mode)
    gm = passes.dropout_to_modules(passes.hoist_shape_queries(gm))
    return [(f"{type(model).__name__} (whole model, captured now)", gm, None)]


def debug_node(model: nn.Module, node: str, example_inputs=None) -> NodeReport:
    """Explain why the node named `node` is, or is not, part of a reversible coupling.

    Re-runs `passes.find_residual_units` (and `group_layers`) on the graph the analysis saw
    (after `dropout_to_modules`; node names as printed by `graphs()`). For a converted model the
    graphs of its converted modules are searched; any other module is captured first (pass
    `example_inputs` unless it is a transformers model). The report says whether the node carries
    data to the output, whether it fans out (a residual unit starts at a value used twice), its
    immediate post-dominator (where all its uses reconverge: a residual add for a unit entry),
    whether it is on the residual stream, which unit/layer/coupling it belongs to, and the
    analysis' rejection reasons that name it.
    """
    import passes
    from passes._graph import data_dag, describe, module_paths, output_node, region

    cands = _analysis_graphs(model, example_inputs)
    for label, gm, conv in cands:
        nodes = {n.name: n for n in gm.graph.nodes}
        if node not in nodes:
            continue
        rep = NodeReport(node=node, graph=label, found=True)
        L = rep.lines
        n = nodes[node]
        L.append(f"op: {describe(n)}")
        src = module_paths(n)
        owner0 = getattr(conv, "owner", "") if conv is not None else ""
        L.append(f"source module: {(owner0 + '.' if owner0 else '') + src[-1] if src else '(none recorded)'}")
        by = n.meta.get(PROVENANCE)
        if by:
            L.append(f"made by pass: {by}")
        dag = data_dag(gm)
        raw = passes.find_residual_units(gm)
        analysis = passes.group_layers(raw)
        if n not in dag:
            L.append("not analysed: it carries no tensor data to the output (a size, a flag, a parameter, or dead code);"
                     " only data nodes can be on the residual stream")
            rep.on_stream = False
            _mention(rep, analysis)
            return rep
        out = output_node(gm)
        ipdom = nx.immediate_dominators(dag.reverse(copy=False), out)
        users = list(dag.successors(n))
        rep.fans_out = len(users) >= 2
        L.append(f"fans out: {'yes' if rep.fans_out else 'no'} ({len(users)} data user(s): "
                 f"{', '.join(u.name for u in users[:6])}{', ...' if len(users) > 6 else ''})")
        pd = ipdom.get(n)
        rep.post_dominator = pd.name if pd is not None and pd is not n and pd is not out else None
        from passes._graph import is_add
        if rep.post_dominator is None:
            L.append("immediate post-dominator: the graph output (its uses do not reconverge before the output)")
        else:
            L.append(f"immediate post-dominator: {pd.name} ({'an add' if is_add(pd) else 'not an add'}) — every path "
                     f"from {node} to the output goes through it")
        if not rep.fans_out:
            L.append("residual pattern x + f(x): no — a unit's entry must be used at least twice (skip and branch)")
        elif rep.post_dominator is None or not is_add(pd):
            L.append(f"residual pattern x + f(x): no — its uses reconverge at {rep.post_dominator or 'the output'}, not at an add")
        elif n not in pd.args[:2]:
            L.append(f"residual pattern x + f(x): no — {pd.name} does not add {node} itself")
        else:
            other = pd.args[1] if pd.args[0] is n else pd.args[0]
            dep = isinstance(other, fx.Node) and other in dag and nx.has_path(dag, n, other)
            L.append(f"residual pattern x + f(x): {'yes' if dep else 'no'} — {pd.name} adds {node} to "
                     f"{getattr(other, 'name', other)}, which {'is' if dep else 'is not'} computed from it")
        # stream membership, unit, layer, coupling
        owner = getattr(conv, "owner", "") if conv is not None else ""

        def full(path):
            return f"{owner}.{path}" if owner and path else (path or owner or "the model")

        rep.on_stream = False
        for stack in raw.stacks:
            s, e = nodes[stack.start], nodes[stack.end]
            chain, cur, steps = {s}, s, 0
            while cur is not e and cur is not None and steps < len(nodes):
                cur = ipdom.get(cur)
                chain.add(cur)
                steps += 1
            if n in chain:
                rep.on_stream = True
                L.append(f"on the residual stream: yes — a stream state of the stack in {full(stack.owner)} "
                         f"(from {stack.start} to {stack.end}): every path from the stack's input to its output goes through it")
        if not rep.on_stream:
            L.append("on the residual stream: no" + ("" if raw.stacks else " (no stack was found in this graph)"))
        # coupling index of every unit that made it into a layer
        coupling_of, layer_of, ci = {}, {}, 0
        for stack in analysis.stacks:
            for li, layer in enumerate(stack.layers):
                for u in layer.units:
                    coupling_of[id(u)], layer_of[id(u)] = ci + li, layer
                if n.name == layer.start:
                    L.append(f"stream state entering layer {full(layer.module)}: the input of coupling {ci + li}")
                    rep.coupling = ci + li if rep.coupling is None else rep.coupling
            ci += len(stack.layers)
        left_out = []
        for stack in raw.stacks:
            for u in stack.units:
                entry = nodes[u.entry or u.start]
                if n is entry or n not in region(dag, entry, nodes[u.end]):
                    continue
                uname = full(u.module) if (u.module or owner) else "in the root module"
                rep.unit = f"{u.kind} unit {uname} ({entry.name} → {u.add}" + \
                           (f" → {u.end}" if u.end != u.add else "") + ")"
                where = "residual add" if n.name == u.add else "end (the stream state it writes)" \
                    if n.name == u.end else "branch"
                if id(u) in coupling_of:
                    c, half = coupling_of[id(u)], _half(conv, u)
                    rep.coupling = c
                    L.append(f"belongs to: {rep.unit}, its {where}; layer {full(layer_of[id(u)].module)}")
                    L.append(f"rewritten: yes — computed by coupling {c}" + (f"'s {half}" if half else ""))
                else:
                    L.append(f"belongs to: {rep.unit}, its {where}")
                    L.append("rewritten: no — group_layers left this unit out (a layer is attention unit(s) then one FFN unit)")
                    left_out.append(u)
        if rep.coupling is None and not left_out:
            L.append("rewritten: no — it is in no residual unit on a stream")
        _mention(rep, analysis, [u.module for u in left_out if u.module] + [u.add for u in left_out])
        return rep
    names = [n.name for _, gm, _ in cands for n in gm.graph.nodes]
    close = difflib.get_close_matches(node, names, n=6, cutoff=0.5)
    rep = NodeReport(node=node, graph=", ".join(label for label, _, _ in cands))
    rep.lines.append("not found" + (f"; close names: {', '.join(close)}" if close else "") +
                     ". Node names are those printed by `python -m meft_fx inspect MODEL --graph dropout_to_modules`"
                     " (or `captured`).")
    return rep


def _half(conv, unit) -> str:
    method = getattr(getattr(conv, "_config", None), "method", "") if conv is not None else ""
    if method == "meft3":
        return "F" if unit.kind == "attention" else "G"
    if method == "meft1":
        return "F"
    if method == "meft2":
        return "G"
    return ""


def _mention(rep: NodeReport, analysis, also=()) -> None:
    """Add the analysis' rejection reasons that name the node (or one of `also`: unit modules, adds)."""
    words = [rep.node, *also]
    pat = re.compile("|".join(rf"(?<![\w.]){re.escape(w)}(?![\w.])" for w in words))
    said = [r for r in analysis.rejected if pat.search(r)]
    for r in said:
        rep.lines.append(f"analysis says: {r}")
