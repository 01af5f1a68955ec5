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
    _drop_same_dtype_casts(gm.graph)
    _flat_parameters(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_same_dtype_casts(graph: fx.Graph) -> None:
    """`x.to(dtype)` of an `x` already of that dtype (recorded at capture) is `x`: a dispatcher call per token saved."""
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.to.dtype and len(n.args) == 2 and not n.kwargs:
            val = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
            if isinstance(val, torch.Tensor) and val.dtype == n.args[1]:
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)


def _flat_parameters(gm: fx.GraphModule) -> None:
    """Each parameter or buffer read by a dotted path (`self.mod.layers.0.self_attn.q_proj.weight`: five attribute
    lookups per token) is also an attribute of the copy itself, read in one (the same tensor, shared)."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and "." in n.target:
            value = gm.get_submodule(n.target.rpartition(".")[0])._parameters.get(n.target.rpartition(".")[2])
            value = value if value is not None else gm.get_buffer(n.target) if _is_buffer(gm, n.target) else None
            if isinstance(value, torch.Tensor):
                flat = "flat_" + n.target.replace(".", "_")
                gm.__dict__[flat] = value  # a plain attribute: no Module.__getattr__, not a second parameter
                n.target = flat


def _is_buffer(gm: fx.GraphModule, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    return name in gm.get_submodule(owner)._buffers


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
