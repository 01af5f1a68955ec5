"""A copy of a block whose attention reads and extends a KV cache (for generation only).

The block's one SDPA — `aten.scaled_dot_product_attention`, the `masked_sdpa` call `causal_masks` made of it,
or the `AttentionWithDropout` module `dropout_to_modules` made of it — becomes `meft_fx.nn.cached_attention.cached_attention(q, k, v,
mask, layer=i)`: the new keys and values (after rotary embeddings and GQA's repeat, i.e. what SDPA
received) are appended to layer i of the running step's cache and the queries attend over all of
them. Dropout is dropped (generation runs in eval mode). The training graph is not touched: the
copy shares the block's parameters and submodules.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from meft_fx.nn.attention import AttentionWithDropout
from meft_fx.nn.cached_attention import cached_attention
from meft_fx.nn.causal import masked_sdpa

from ..fx.ops import attention_nodes, is_whole_slice
from ..fx.provenance import replace_node

PASS = "cache_attention"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _bound(gm: fx.GraphModule, n: fx.Node) -> dict | None:
    """SDPA's arguments by name, or None when `n` is not an SDPA."""
    if n.op == "call_function" and n.target in (_SDPA, masked_sdpa):
        return {**dict(zip(_NAMES, n.args)), **n.kwargs}
    mod = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(mod, AttentionWithDropout):
        return {**dict(zip(_NAMES, n.args)), "scale": mod.scale, "enable_gqa": mod.enable_gqa}
    return None


def cache_attention(block: fx.GraphModule, layer: int) -> fx.GraphModule:
    """A copy of `block` whose SDPA is `cached_attention(..., layer=layer)`.

    ValueError (naming the node) when the block has no SDPA, several, or attention of another
    form (a softmax over keys written out, as transformers' "eager" attention does): use
    attn_implementation="sdpa" for cached generation."""
    gm = fx.GraphModule(block, _copied(block.graph), class_name=type(block).__name__ + "Cached")
    found = [(n, _bound(gm, n)) for n in gm.graph.nodes]
    sdpa = [(n, b) for n, b in found if b is not None]
    mixing = attention_nodes(gm)
    other = [n for n, b in found if b is None and n in mixing]
    if len(sdpa) != 1 or other:
        what = ", ".join(n.format_node() for n in [s for s, _ in sdpa] + other) or "none"
        raise ValueError(f"layer {layer}: a KV cache needs exactly one scaled_dot_product_attention per attention "
                         f"block; found {what}. Load the model with attn_implementation='sdpa'")
    n, b = sdpa[0]
    new = replace_node(gm, n, "call_function", cached_attention, (b["query"], b["key"], b["value"], b.get("attn_mask")),
                       PASS)
    new.kwargs = {"layer": layer, "scale": b.get("scale"), "enable_gqa": bool(b.get("enable_gqa", False))}
    _drop_whole_slices(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_whole_slices(graph: fx.Graph) -> None:
    """`x[:, 0:]`-style slices of a whole dimension are `x` (inference runs them once per token)."""
    for n in list(graph.nodes):
        if is_whole_slice(n):
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)


def _copied(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
