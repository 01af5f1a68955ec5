"""What an fx node computes, by op class: adds, attention, linear maps, reshapes, randomness, sizes.

Both IRs are understood: torch.export's ATen graphs and torch.fx.symbolic_trace graphs
(call_module leaves such as nn.Linear, torch/operator call_functions, call_methods).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from meft_fx.nn.causal import masked_sdpa

aten = torch.ops.aten


def _targets(*names: str) -> set:
    out = set()
    for name in names:
        op = getattr(aten, name, None)
        if op is None:
            continue
        out.update(getattr(op, o) for o in op.overloads())
    return out


ADD_TARGETS = _targets("add") | {operator.add, torch.add, operator.iadd}
INPLACE_ADD_TARGETS = _targets("add_")
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


FUSED_ATTENTION_TARGETS = _targets(
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
) | {Fn.scaled_dot_product_attention, masked_sdpa}
SOFTMAX_TARGETS = _targets("_softmax", "softmax", "_safe_softmax") | {torch.softmax, Fn.softmax}
#: products whose two operands may both be activations (q·kᵀ, probabilities·v)
PRODUCT_TARGETS = _targets("matmul", "bmm", "baddbmm", "mm", "einsum") | {torch.matmul, torch.bmm, torch.einsum,
                                                                           operator.matmul}
#: how far back from a softmax to look for the product of two activations that made its scores
SCORE_DEPTH = 16


def attention_nodes(gm: fx.GraphModule) -> set:
    """The nodes of `gm` that mix information across positions (tokens), i.e. attention.

    A fused attention op (SDPA and friends, `nn.MultiheadAttention`, meft_fx's AttentionWithDropout),
    or a softmax over scores that are a product of two activations (q·kᵀ): a softmax over a linear
    map of one activation (a mixture-of-experts router: `softmax(x @ W_router)`) is position-wise,
    as are the routed experts, so a routed FFN is an FFN. An activation is a value computed from a
    graph input; parameters, buffers and constants are not.
    """
    activations = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in activations for a in n.all_input_nodes):
            activations.add(n)
    out = set()
    for n in gm.graph.nodes:
        if _is_fused_attention(gm, n) or (_is_softmax(gm, n) and _scores_are_a_product(gm, n, activations)):
            out.add(n)
    return out


def _is_fused_attention(gm, node) -> bool:
    if node.op == "call_function":
        return node.target in FUSED_ATTENTION_TARGETS
    mod = _module(gm, node)
    return isinstance(mod, torch.nn.MultiheadAttention) or type(mod).__name__ == "AttentionWithDropout"


def _is_softmax(gm, node) -> bool:
    if node.op == "call_function":
        return node.target in SOFTMAX_TARGETS
    if node.op == "call_method":
        return node.target == "softmax"
    return isinstance(_module(gm, node), torch.nn.Softmax)


def _scores_are_a_product(gm, softmax: fx.Node, activations: set) -> bool:
    """Do the scores under `softmax` come from a product of two activations (q·kᵀ)? Walks back at most
    SCORE_DEPTH nodes, not through a linear map of one activation (a projection: a router's logits, or
    the previous block's output projection)."""
    seen, frontier = set(), list(softmax.all_input_nodes)
    while frontier and len(seen) < SCORE_DEPTH:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if _is_product(gm, n) and sum(o in activations for o in _operands(n)) >= 2:
            return True
        if not (is_linear(gm, n) or _is_product(gm, n)):
            frontier.extend(n.all_input_nodes)
    return False


def _is_product(gm, node) -> bool:
    if node.op == "call_function":
        return node.target in PRODUCT_TARGETS
    return node.op == "call_method" and node.target in ("matmul", "__matmul__", "bmm")


def _operands(node) -> list:
    """The tensor operands of a product node (einsum's come as a list after the equation)."""
    args = [a for a in node.args if not isinstance(a, str)]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return [a for a in args if isinstance(a, fx.Node)]


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


def is_whole_slice(node) -> bool:
    """`x[:, 0:]`-style `aten.slice(x, dim, 0, 2^63 - 1)` as torch.export writes it: `x` itself."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.slice.Tensor
            and len(node.args) == 4 and node.args[2] == 0 and node.args[3] == 2 ** 63 - 1 and not node.kwargs)


def is_shape_only(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in SHAPE_ONLY_TARGETS
    return node.op == "call_method" and node.target in ("view", "reshape", "contiguous", "flatten", "clone")


TOPK_TARGETS = _targets("topk") | {torch.topk}
CAST_TARGETS = _targets("to", "_to_copy", "type_as")
CAST_METHODS = ("to", "type", "type_as", "float", "double", "half", "bfloat16")


def is_layout_only(node: fx.Node) -> bool:
    """Does the node only reshape, copy or cast its input (its values stay the same numbers)?"""
    if node.op == "call_function" and node.target in CAST_TARGETS:
        return True
    return is_shape_only(node) or (node.op == "call_method" and node.target in CAST_METHODS)


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
