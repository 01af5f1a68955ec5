"""What an fx node computes, by op class: adds, attention, linear maps, reshapes, randomness, sizes.

Both IRs are understood: torch.export's ATen graphs and torch.fx.symbolic_trace graphs
(call_module leaves such as nn.Linear, torch/operator call_functions, call_methods).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as Fn

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
