"""Look inside a converted model: every intermediate program, headed by who made it.

    for name, gm in meft_fx.graphs(rev).items():   # captured, each pass, final, per-coupling programs
        print(gm.code)                              # valid Python, headed "# made by pass ..."

Like lightning-thunder's `last_traces`, each program says which pass made it: the header comment,
`gm.meta["meft_pass"]`, and per node `node.meta["meft_pass"]` ("capture" for nodes the tracer
made). Lines of nodes a later pass added end in `# <- PASS`. The per-coupling programs are the
very GraphModules the runtime runs (a hook on `coupling0/backward` fires in the backward).
"""
from __future__ import annotations

import difflib
import re
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn

from ..conversion import ConvertedModule
from ..passes.fx.dataflow import tensor_dtype
from ..runtime import ReversibleStack, stacks_in
from ..runtime.codegen import PROGRAMS, PROVENANCE_KEY, label_program

__all__ = ["graphs", "show", "format_program", "find_graph", "converted_modules", "stack_calls", "stack_call",
           "made_by"]


def converted_modules(model: nn.Module) -> list:
    """[(path, ConvertedModule)] in `model` (path "" when `model` itself was replaced)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ConvertedModule)]


def stack_calls(gm: fx.GraphModule) -> list:
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


def stack_call(model: nn.Module, inputs: dict):
    """(stack, x, context): the first `ReversibleStack` that `model(**inputs)` runs and the stream
    input and context tensors it is called with, from one eval-mode, no-grad forward (the model is
    left in eval mode). For running or inverting a stack's couplings by hand."""
    st = next(iter(stacks_in(model)), None)
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
    return (getattr(gm, "meta", None) or {}).get(PROVENANCE_KEY, "?")


def _marker(graph: fx.Graph, own: str):
    """Body transformer: end the line of each node that a later pass made with `# <- PASS`."""
    def provenance(n):
        return n.meta.get(PROVENANCE_KEY, "capture")

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
    g.output(g.graph_copy(gm.graph, {}))
    for n in g.nodes:
        if n.op != "output":
            n.meta.setdefault(PROVENANCE_KEY, "capture")
    g._codegen = gm.graph._codegen
    prog = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    return label_program(prog, pass_name, name, note, marker=_marker(g, pass_name))


def _trace_leaf(mod: nn.Module):
    """A GraphModule for F/G: itself, or a trace of a stand-alone adapter."""
    if isinstance(mod, fx.GraphModule):
        return mod
    try:
        return fx.symbolic_trace(mod)
    except Exception:  # noqa: BLE001 - not every module traces; it is then left out
        return None


def _coupling_programs(out: OrderedDict, pre: str, i: int, stack: ReversibleStack, c, dtype) -> None:
    """coupling{i}/forward, /inverse, /backward (the programs that run, relabelled) and /F, /G."""
    for which in PROGRAMS:
        name = f"{pre}coupling{i}/{which}"
        prog = stack.couplings[c].program(which, stack.running_arithmetic(), stack.num_context, dtype)
        out[name] = label_program(prog, "codegen", name, prog.meta.get("meft_note", ""))
    for half in ("F", "G"):
        sub = _trace_leaf(getattr(stack.couplings[c], half))
        if sub is not None:
            name = f"{pre}coupling{i}/{half}"
            by = made_by(sub) if made_by(sub) != "?" else "build_couplings"
            out[name] = _program(sub, by, name, f"{half} of coupling {i}, called as (stream, *context)")


def _variant_programs(out: OrderedDict, pre: str, gm: fx.GraphModule, first: int) -> int:
    """Add one captured variant's programs; returns the index after its last coupling."""
    last = "capture"
    for pname, prog in (getattr(gm, "meft_programs", {}) or {}).items():
        last = made_by(prog)
        out[pre + pname] = _program(prog, last, pre + pname)
    out[pre + "final"] = _program(gm, last, pre + "final", "the program the converted module runs")
    i = first
    for call, stack in stack_calls(gm):
        dtype = tensor_dtype(call.args[0]) if isinstance(call.args[0], fx.Node) else None
        for c in range(len(stack.couplings)):
            _coupling_programs(out, pre, i, stack, c, dtype or torch.float32)
            i += 1
    return i


def graphs(model: nn.Module) -> "OrderedDict[str, fx.GraphModule]":
    """Every program of a converted model, in pipeline order: name → `torch.fx.GraphModule`.

    Per converted module (names prefixed with its owner path and "/" when the model has several;
    further captured call structures, see `ConvertedModule.variants`, add "variantK/"):

    - ``captured``: the graph the tracer produced;
    - one graph per transform of `meft_fx.passes.PIPELINE`, named after it (``hoist_shape_queries``,
      ``dropout_to_modules``, ``insert_adapters``, ``build_couplings``);
    - ``final``: the program the converted module runs;
    - per coupling i (numbered as in `meft_fx.explain`): ``coupling{i}/forward``,
      ``coupling{i}/inverse`` and ``coupling{i}/backward`` — the generated programs in the stack's
      stream arithmetic (`meft_fx.runtime.codegen`); forward and backward are the very objects the
      runtime runs — and ``coupling{i}/F``, ``coupling{i}/G`` (the sub-blocks cut out of the graph).

    Pass snapshots are copies sharing the model's parameters, so they run; every `.code` is valid
    Python whose first line is ``# made by pass NAME`` (also in ``gm.meta["meft_pass"]``), and code
    lines of nodes added by a later pass than capture end in ``# <- PASS``.
    """
    convs = converted_modules(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} holds no converted module; was it returned by meft_fx.convert?")
    out: OrderedDict = OrderedDict()
    base = 0
    for path, conv in convs:
        prefix = f"{conv.owner or path or '<root>'}/" if len(convs) > 1 else ""
        n_main = base
        for k, gm in enumerate(conv.graph_modules):
            end = _variant_programs(out, prefix + (f"variant{k}/" if k else ""), gm, base)
            n_main = end if k == 0 else n_main
        base = n_main
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
