"""Every dropout in the graph is a submodule, so `train()`/`eval()` switch it.

torch.export bakes train mode into the graph: `aten.dropout(x, p, True)` and attention dropout
inside `scaled_dot_product_attention(..., dropout_p)`. After this pass, dropouts are
`meft_fx.nn.dropout.Dropout` modules (an `nn.Dropout` whose masks are drawn with `torch.rand`, half
the CPU time of `bernoulli_`) and dropping attention is an `AttentionWithDropout` module
(`meft_fx.nn.attention`: in training it keeps no (batch, heads, L, S) tensor for the backward), so the
captured graph follows the module's mode like the original model did. Masks have the original's
distribution but are not the numbers the original draws for the same seed.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from meft_fx.nn.attention import AttentionWithDropout
from meft_fx.nn.dropout import Dropout

from ..fx.ops import DROPOUT_TARGETS
from ..fx.provenance import replace_node

PASS = "dropout_to_modules"
aten = torch.ops.aten


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
    """Replace functional dropout calls by fresh `meft_fx.nn.dropout.Dropout(p)` submodules and dropping
    attention by `AttentionWithDropout` submodules; drop the ones that are off (p = 0 or train=False)."""
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
        gm.add_submodule(name, Dropout(float(p)))
        replace_node(gm, n, "call_module", name, (x,), PASS)
    gm.graph.lint()
    gm.recompile()
    return gm
