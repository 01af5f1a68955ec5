"""Attention over a KV cache, for generation: what `cache_attention` puts where a coupling's SDPA was.

`cached_attention(q, k, v, mask, layer=i)` appends the new keys and values to layer i's entry of the
cache of the running generation step (`active_cache`) and attends over all of them:

    k, v = cache.update(k, v, i)            # the transformers Cache API (DynamicCache, ...)
    out  = SDPA(q, k, v, mask)              # mask: (…, new tokens, cached + new tokens)

A missing mask means causal: bottom-right aligned (new token t sees every cached token and the new
ones up to t), not SDPA's top-left `is_causal`. Outside a generation step it is an error.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

__all__ = ["cached_attention", "active_cache", "using_cache"]

_CACHE: contextvars.ContextVar = contextvars.ContextVar("meft_fx_kv_cache", default=None)


def active_cache():
    """The cache of the running generation step (None outside one)."""
    return _CACHE.get()


@contextlib.contextmanager
def using_cache(cache):
    """Within the block, `cached_attention` reads and extends `cache`."""
    token = _CACHE.set(cache)
    try:
        yield cache
    finally:
        _CACHE.reset(token)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(q_len, kv_len) bool mask, bottom-right aligned: query t sees keys ≤ kv_len − q_len + t."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= rows


def cached_attention(q, k, v, attn_mask=None, *, layer: int, is_causal: bool = False, scale=None,
                     enable_gqa: bool = False) -> torch.Tensor:
    """SDPA of the new queries `q` over the cached keys/values of `layer` followed by the new `k`, `v`."""
    cache = _CACHE.get()
    if cache is None:
        raise RuntimeError("cached_attention runs inside a generation step only (meft_fx.generation)")
    k, v = cache.update(k, v, layer)
    q_len, kv_len = q.size(-2), k.size(-2)
    if attn_mask is None:
        if q_len > 1:
            attn_mask = causal_mask(q_len, kv_len, q.device)
    elif attn_mask.size(-1) != kv_len:
        raise ValueError(f"cached attention (layer {layer}): the mask covers {attn_mask.size(-1)} keys, the cache "
                         f"holds {kv_len} (the model's mask was not built for its cache)")
    elif q_len == 1 and attn_mask.dtype == torch.bool and bool(attn_mask.all()):
        attn_mask = None  # one new token that sees every key: SDPA would turn the mask into a float copy per layer
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
