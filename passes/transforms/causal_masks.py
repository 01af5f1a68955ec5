"""An SDPA given a boolean mask runs on the causal kernel whenever that mask is exactly causal.

`scaled_dot_product_attention(q, k, v, mask)` with a boolean mask, no dropout and `is_causal=False`
becomes `meft_fx.nn.causal.masked_sdpa(q, k, v, mask, scale=…, enable_gqa=…)`: at run time, a mask that
is the top-left causal pattern (a decoder's batch without padding) is replaced by `is_causal=True`, any
other mask is passed on as before. Same attention; a traced decoder then runs what transformers runs
eagerly, without the float copy of the mask SDPA makes on every call.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from meft_fx.nn.causal import masked_sdpa

from ..fx.provenance import replace_node

PASS = "causal_masks"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _bool_tensor(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def causal_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each SDPA with a boolean mask (no dropout, not is_causal) by `masked_sdpa`."""
    for n in list(gm.graph.find_nodes(op="call_function", target=_SDPA)):
        bound = {**dict(zip(_NAMES, n.args)), **n.kwargs}
        if bound.get("dropout_p", 0.0) != 0 or bound.get("is_causal", False) or not _bool_tensor(bound.get("attn_mask")):
            continue
        if set(bound) - {*_NAMES, "scale", "enable_gqa"}:
            continue  # arguments masked_sdpa does not take
        new = replace_node(gm, n, "call_function", masked_sdpa,
                           (bound["query"], bound["key"], bound["value"], bound["attn_mask"]), PASS)
        new.kwargs = {"scale": bound.get("scale"), "enable_gqa": bool(bound.get("enable_gqa", False))}
    gm.graph.lint()
    gm.recompile()
    return gm
