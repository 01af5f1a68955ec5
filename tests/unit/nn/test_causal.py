"""masked_sdpa: SDPA given a boolean mask, on the causal kernel exactly when the mask is causal."""
import pytest
import torch
import torch.nn.functional as F

from meft_fx.nn.causal import is_causal_mask, masked_sdpa


def _qkv(b=2, heads=4, kv_heads=2, length=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, length, d, generator=g), torch.randn(b, kv_heads, length, d, generator=g),
            torch.randn(b, kv_heads, length, d, generator=g))


def _causal(b=2, length=9):
    return torch.ones(length, length, dtype=torch.bool).tril().expand(b, 1, length, length)


def test_only_the_top_left_causal_pattern_counts_as_causal():
    m = _causal()
    assert is_causal_mask(m, 9, 9) and is_causal_mask(m.clone(), 9, 9) and is_causal_mask(m[0, 0], 9, 9)
    padded = m.clone()
    padded[1, :, :, :2] = False  # left padding in one row of the batch
    assert not is_causal_mask(padded, 9, 9)
    assert not is_causal_mask(torch.ones(2, 1, 9, 9, dtype=torch.bool), 9, 9)  # bidirectional
    assert not is_causal_mask(m, 9, 11) and not is_causal_mask(m.float(), 9, 9) and not is_causal_mask(None, 9, 9)


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_a_causal_mask_runs_is_causal_and_any_other_the_mask(sdpa_calls):
    q, k, v = _qkv()
    m = _causal()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    sdpa_calls.clear()
    out = masked_sdpa(q, k, v, m, enable_gqa=True)
    assert sdpa_calls[-1]["is_causal"] is True and sdpa_calls[-1].get("attn_mask") is None
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # the same attention, another kernel
    padded = m.clone()
    padded[0, :, :, :3] = False
    padded[0, :, :3, 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=padded, scale=0.3, enable_gqa=True)
    out = masked_sdpa(q, k, v, padded, scale=0.3, enable_gqa=True)
    assert sdpa_calls[-1]["attn_mask"] is padded and torch.equal(out, ref)


def test_traced_programs_always_take_the_mask(sdpa_calls, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, v = _qkv()
    masked_sdpa(q, k, v, _causal(), enable_gqa=True)
    assert sdpa_calls[-1]["attn_mask"] is not None
