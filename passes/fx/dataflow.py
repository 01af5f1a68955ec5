"""The data flow of a graph: recorded values, which nodes carry tensors, the DAG of data to the output."""
from __future__ import annotations

from typing import Iterable

import networkx as nx
import sympy
import torch
import torch.fx as fx

from .ops import SYM_SIZE_TARGETS


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


def size_expr(d):
    """A dimension as a sympy expression (a SymInt's own, an int's number)."""
    expr = getattr(getattr(d, "node", None), "expr", None) if isinstance(d, torch.SymInt) else None
    return expr if expr is not None else sympy.Integer(int(d))


def _tokens(gm: fx.GraphModule):
    """The token count of a position-wise `gm` (its first placeholder is the stream, tokens × width) as a sympy
    expression, or None when the stream's token dimensions are not symbolic (then a tensor's size alone would
    not say which of its dimensions are tokens)."""
    stream = next(iter(gm.graph.find_nodes(op="placeholder")), None)
    shape = tensor_shape(stream) if stream is not None else None
    if not shape or not any(isinstance(d, torch.SymInt) for d in shape[:-1]):
        return None
    return sympy.Mul(*[size_expr(d) for d in shape[:-1]])


def _per(sizes, tokens) -> int | None:
    ratio = sympy.cancel(sympy.Mul(*[size_expr(d) for d in sizes]) / tokens)
    return int(ratio) if ratio.is_Integer else None


def per_token(gm: fx.GraphModule, sizes) -> int | None:
    """How many elements per token of `gm`'s stream a tensor of `sizes` holds (N for N · tokens elements), or None
    when that is not a constant (a weight, or no symbolic shapes)."""
    tokens = _tokens(gm)
    return None if tokens is None else _per(sizes, tokens)


def widest_per_token(gm: fx.GraphModule) -> int:
    """The most elements per token of any tensor a position-wise `gm` computes, read off the recorded symbolic
    shapes: (top-k · tokens, 2 · intermediate) counts 2 · top-k · intermediate (Mixtral's experts). 0 without
    symbolic shapes."""
    tokens = _tokens(gm)
    if tokens is None:
        return 0
    sizes = [tensor_shape(n) for n in gm.graph.nodes if n.op == "call_function"]
    return max([0] + [w for w in (_per(s, tokens) for s in sizes if s is not None) if w])


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
