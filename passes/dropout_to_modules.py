"""Every dropout in the graph is a submodule, so `train()`/`eval()` switch it.

torch.export bakes train mode into the graph: `aten.dropout(x, p, True)` and attention dropout
inside `scaled_dot_product_attention(..., dropout_p)`. After this pass, dropouts are `nn.Dropout`
modules and dropping attention is an `AttentionWithDropout` module, so the captured graph follows
the module's mode like the original model did.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ._graph import DROPOUT_TARGETS, replace_node

PASS = "dropout_to_modules"
aten = torch.ops.aten


class AttentionWithDropout(torch.nn.Module):
    """`scaled_dot_product_attention` whose attention dropout is on only in training mode."""

    def __init__(self, p: float, is_causal: bool = False, scale=None, enable_gqa: bool = False):
        super().__init__()
        self.p, self.is_causal, self.scale, self.enable_gqa = float(p), bool(is_causal), scale, bool(enable_gqa)

    def forward(self, q, k, v, attn_mask=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0, is_causal=self.is_causal,
            scale=self.scale, enable_gqa=self.enable_gqa)

    def extra_repr(self) -> str:
        return f"p={self.p}, is_causal={self.is_causal}, scale={self.scale}, enable_gqa={self.enable_gqa}"


def _free_name(gm, prefix: str) -> str:
    k = 0
    while hasattr(gm, f"{prefix}_{k}"):
        k += 1
    return f"{prefix}_{k}"


def _sdpa_to_module(gm: fx.GraphModule, n: fx.Node) -> None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, n.args))
    bound.update(n.kwargs)
    p = bound.get("dropout_p", 0.0)
    if not isinstance(p, (int, float)) or p == 0:
        return
    name = _free_name(gm, "meft_attention")
    gm.add_submodule(name, AttentionWithDropout(p, bound.get("is_causal", False), bound.get("scale"),
                                                bound.get("enable_gqa", False)))
    replace_node(gm, n, "call_module", name, (bound["query"], bound["key"], bound["value"], bound.get("attn_mask")), PASS)


def dropout_to_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace functional dropout calls by calls to fresh `nn.Dropout(p)` submodules."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default:
            _sdpa_to_module(gm, n)
            continue
        if n.op != "call_function" or n.target not in DROPOUT_TARGETS:
            continue
        args = list(n.args) + [None] * 3
        x = args[0]
        p = n.kwargs.get("p", args[1] if args[1] is not None else 0.5)
        train = n.kwargs.get("train", n.kwargs.get("training", args[2] if args[2] is not None else True))
        if not isinstance(p, (int, float)) or not isinstance(train, bool):
            continue
        if not train or p == 0:
            n.replace_all_uses_with(x)
            gm.graph.erase_node(n)
            continue
        name = _free_name(gm, "meft_dropout")
        gm.add_submodule(name, torch.nn.Dropout(float(p)))
        replace_node(gm, n, "call_module", name, (x,), PASS)
    gm.graph.lint()
    gm.recompile()
    return gm
