"""Shared helpers for the passes: what an op is, which nodes carry data, regions, extraction.

Both IRs are understood: torch.export's ATen graphs and torch.fx.symbolic_trace graphs
(call_module leaves such as nn.Linear, torch/operator call_functions, call_methods).
"""
from __future__ import annotations

import copy
import operator
from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as Fn

aten = torch.ops.aten

PROVENANCE_KEY = "meft_pass"


def stamp(node: fx.Node, pass_name: str) -> fx.Node:
    """Record on `node.meta` which pass created it (shown by `meft_fx.graphs`)."""
    node.meta[PROVENANCE_KEY] = pass_name
    return node


def replace_node(gm: fx.GraphModule, old: fx.Node, op: str, target, args: tuple, pass_name: str) -> fx.Node:
    """Put a new `op` node (call_function / call_module) where `old` was: same meta, stamped, old erased."""
    with gm.graph.inserting_before(old):
        new = gm.graph.create_node(op, target, args)
    new.meta = dict(old.meta)
    stamp(new, pass_name)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


# ----------------------------------------------------------------------------- op classes

def _targets(*names: str) -> set:
    out = set()
    for name in names:
        op = getattr(aten, name, None)
        if op is None:
            continue
        out.update(getattr(op, o) for o in op.overloads())
    return out


ADD_TARGETS = _targets("add") | {operator.add, torch.add, operator.iadd}
ATTENTION_TARGETS = _targets(
    "scaled_dot_product_attention", "_softmax", "softmax", "_safe_softmax",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
) | {torch.softmax, Fn.softmax, Fn.scaled_dot_product_attention}
LINEAR_TARGETS = _targets("linear", "addmm", "mm", "matmul", "bmm") | {Fn.linear, torch.matmul, torch.mm, torch.addmm, operator.matmul}
SHAPE_ONLY_TARGETS = _targets("view", "reshape", "_unsafe_view", "flatten", "contiguous", "clone", "alias") | {torch.reshape, torch.flatten}
DROPOUT_TARGETS = _targets("dropout", "feature_dropout", "alpha_dropout") | {Fn.dropout}
RANDOM_TARGETS = DROPOUT_TARGETS | _targets("native_dropout", "bernoulli", "rand", "randn", "rand_like", "randn_like", "randint", "multinomial")
SYM_SIZE_TARGETS = _targets("sym_size", "sym_numel", "sym_stride", "sym_storage_offset")


def _module(gm: fx.GraphModule, node: fx.Node):
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_TARGETS) or (node.op == "call_method" and node.target in ("add", "__add__"))


def is_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that mix information across positions: softmax over keys or fused attention."""
    if node.op == "call_function":
        return node.target in ATTENTION_TARGETS
    if node.op == "call_method":
        return node.target == "softmax"
    mod = _module(gm, node)
    return isinstance(mod, (torch.nn.Softmax, torch.nn.MultiheadAttention)) or type(mod).__name__ == "AttentionWithDropout"


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in LINEAR_TARGETS
    if node.op == "call_method":
        return node.target in ("matmul", "__matmul__")
    return isinstance(_module(gm, node), torch.nn.Linear)


def linear_input(gm: fx.GraphModule, node: fx.Node):
    """The activation operand of a linear-like node (not the weight)."""
    if node.op == "call_function" and node.target in _targets("addmm") | {torch.addmm}:
        return node.args[1]
    return node.args[0]


def is_shape_only(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in SHAPE_ONLY_TARGETS
    return node.op == "call_method" and node.target in ("view", "reshape", "contiguous", "flatten", "clone")


def is_random(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does this node draw from the global RNG (dropout and friends)?"""
    if node.op == "call_function":
        return node.target in RANDOM_TARGETS
    if node.op == "call_method":
        return node.target in ("bernoulli", "bernoulli_", "uniform_", "normal_")
    return _module_is_random(_module(gm, node))


def _module_is_random(mod) -> bool:
    if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
        return mod.p > 0
    return getattr(mod, "p", 0) > 0 and type(mod).__name__ == "AttentionWithDropout"


def graph_has_random(gm: fx.GraphModule) -> bool:
    """Does running `gm` draw from the RNG (so the reversible backward must replay RNG states)?"""
    return any(is_random(gm, n) for n in gm.graph.nodes) or any(_module_is_random(m) for m in gm.modules())


# ----------------------------------------------------------------------------- values

def node_value(node: fx.Node):
    """The example value recorded on a node: a (fake) tensor, SymInt, tuple..., or None."""
    if "val" in node.meta:
        return node.meta["val"]
    tm = node.meta.get("tensor_meta")
    if tm is not None:
        return tm
    return None


def tensor_shape(node: fx.Node):
    v = node_value(node)
    if isinstance(v, torch.Tensor) or hasattr(v, "shape") and hasattr(v, "dtype"):
        return tuple(v.shape)
    return None


def tensor_dtype(node: fx.Node):
    v = node_value(node)
    return getattr(v, "dtype", None)


def _contains_tensor(v) -> bool:
    if isinstance(v, torch.Tensor) or (hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, type)):
        return True
    if isinstance(v, (tuple, list)):
        return any(_contains_tensor(x) for x in v)
    return False


def is_data(node: fx.Node) -> bool:
    """Does the node carry tensor data (as opposed to a size, a flag, or nothing)?"""
    if node.op in ("output",):
        return True
    if node.op == "call_function" and node.target in SYM_SIZE_TARGETS:
        return False
    if node.op == "call_module" and node.target == "_guards_fn":
        return False
    v = node_value(node)
    if v is not None:
        return _contains_tensor(v)
    # fx graphs without shape propagation: shape queries are not data.
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim"):
        return False
    return True


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def data_dag(gm: fx.GraphModule) -> nx.DiGraph:
    """Producer→consumer DAG of the data nodes from which the output is reachable."""
    g = nx.DiGraph()
    out = output_node(gm)
    for n in gm.graph.nodes:
        if not is_data(n):
            continue
        g.add_node(n)
        for a in n.all_input_nodes:
            if is_data(a):
                g.add_edge(a, n)
    keep = nx.ancestors(g, out) | {out}
    return g.subgraph(keep).copy()


def region(dag: nx.DiGraph, start: fx.Node, end: fx.Node) -> set:
    """Nodes strictly after `start` and up to `end` inclusive: descendants of start that reach end."""
    return (nx.descendants(dag, start) & nx.ancestors(dag, end)) | {end}


def topo(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list:
    s = set(nodes)
    return [n for n in gm.graph.nodes if n in s]


def module_paths(node: fx.Node) -> list:
    """Source module paths of a node, outermost first (from torch.export's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for v in stack.values():
        path = v[0] if isinstance(v, tuple) else v
        if isinstance(path, str):
            # meft_fx.capture calls the traced module through a wrapper whose child is `mod`.
            if path == "mod" or path == "":
                continue
            out.append(path[4:] if path.startswith("mod.") else path)
    if not out and node.op == "call_module":
        parts = str(node.target).split(".")
        out = [".".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    return out


def common_module(nodes: Iterable[fx.Node]) -> str:
    """Deepest source module path shared by all the nodes ("" = the root module)."""
    common = None
    for n in nodes:
        paths = module_paths(n)
        if not paths and n.op not in ("call_module",):
            continue
        if common is None:
            common = paths
        else:
            k = 0
            while k < min(len(common), len(paths)) and common[k] == paths[k]:
                k += 1
            common = common[:k]
    return common[-1] if common else ""


def module_parts(nodes: Iterable[fx.Node], module: str) -> tuple:
    """Child modules of `module` that the nodes come from, in order of first appearance."""
    parts = []
    depth = len(module.split(".")) if module else 0
    for n in nodes:
        for p in module_paths(n):
            if (not module or p.startswith(module + ".")) and len(p.split(".")) == depth + 1:
                child = p.split(".")[-1]
                if child not in parts:
                    parts.append(child)
    return tuple(parts)


def describe(node: fx.Node) -> str:
    try:
        return node.format_node()
    except Exception:  # pragma: no cover - format_node is best effort
        return node.name


# ----------------------------------------------------------------------------- extraction

def extract(gm: fx.GraphModule, nodes: set, stream_in: fx.Node, end: fx.Node, class_name: str, pass_name: str):
    """Copy the region `nodes` (ending in `end`) into a new GraphModule `(stream, *context) -> end`.

    Parameters and buffers (get_attr) and submodules are shared with `gm`, not copied. Every other
    input of the region is a *context* placeholder; returns (module, list of context nodes in `gm`).
    """
    order = topo(gm, nodes)
    # Sizes/flags read off region tensors travel with the region, and so does whatever is computed
    # from them alone (e.g. a causal mask built from x.size(1) in an fx graph): such values do not
    # depend on the stream's data, only on its shape (one pass in topological order, then pruning).
    members = set(order)
    shape_derived: set = set()
    for n in gm.graph.nodes:
        if n in members or n.op in ("placeholder", "get_attr", "output"):
            continue
        if n.op == "call_module" and n.target == "_guards_fn":
            continue
        inside = [a for a in n.all_input_nodes if a in members]
        if inside and (not is_data(n) or all(not is_data(a) or a in shape_derived for a in inside)):
            members.add(n)
            shape_derived.add(n)
    for n in reversed(list(gm.graph.nodes)):
        if n in shape_derived and not any(u in members for u in n.users):
            members.discard(n)
            shape_derived.discard(n)
    order = topo(gm, members)
    context: list = []
    for n in order:
        for a in n.all_input_nodes:
            if a in members or a is stream_in or a.op == "get_attr" or a in context:
                continue
            context.append(a)
    g = fx.Graph()
    env = {stream_in: g.placeholder("stream")}
    env[stream_in].meta = copy.copy(stream_in.meta)
    for i, c in enumerate(context):
        p = g.placeholder(f"ctx_{i}_{c.name}")
        p.meta = copy.copy(c.meta)
        env[c] = p

    def lookup(a):
        if a not in env:
            if a.op == "get_attr":
                env[a] = g.get_attr(a.target)
                env[a].meta = copy.copy(a.meta)
            else:  # pragma: no cover - guarded by the context scan above
                raise KeyError(a.name)
        return env[a]

    for n in order:
        env[n] = g.node_copy(n, lookup)
    g.output(env[end])
    g.lint()
    sub = fx.GraphModule(gm, g, class_name=class_name)
    for n in sub.graph.nodes:
        n.meta.setdefault(PROVENANCE_KEY, n.meta.get(PROVENANCE_KEY, "capture"))
    sub.meta = {PROVENANCE_KEY: pass_name}
    return sub, context
