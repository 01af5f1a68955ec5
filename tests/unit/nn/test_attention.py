
import pytest
import torch
import torch.nn.functional as F

import meft_fx.nn.attention as attention
from meft_fx.nn.attention import AttentionWithDropout, chunked_attention
from meft_fx.nn.dropout import keep_mask

math_sdpa = torch.ops.aten._scaled_dot_product_attention_math


def _qkv(B, H, L, S, E, dtype=torch.float64, Hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv or H, S, E, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv or H, S, E + 3, dtype=dtype, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def _against_math(q, k, v, mask=None, p=0.1, causal=False, scale=None, gqa=False, seed=7):
    """chunked_attention and SDPA's math path given the same dropout mask: outputs and gradients."""
    torch.manual_seed(seed)
    out = chunked_attention(q, k, v, mask, p, causal, scale, gqa)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.manual_seed(seed)  # the mask chunked_attention drew, drawn whole
    drop = keep_mask((*q.shape[:-2], q.size(-2), k.size(-2)), p) if p > 0 else None
    if mask is not None and mask.dtype == torch.bool:  # as F.scaled_dot_product_attention does before the math
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(mask.logical_not(), float("-inf"))
    ref = math_sdpa(q, k, v, mask, p, causal, drop, scale=scale, enable_gqa=gqa)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    return out, ref, grads, ref_grads


CASES = {
    # name: (B, H, L, S, E, mask kind, causal, scale, Hkv)
    "bert-like": (3, 4, 9, 9, 8, "padding", False, None, None),
    "cross-attention": (2, 3, 5, 11, 4, "float", False, None, None),
    "causal": (2, 2, 7, 7, 6, None, True, None, None),
    "bool mask with an all-masked row": (2, 3, 6, 6, 4, "bool", False, None, None),
    "gqa and scale": (2, 4, 5, 5, 4, None, False, 0.3, 2),
}


def _mask(kind, B, L, S, dtype):
    g = torch.Generator().manual_seed(3)
    if kind == "padding":  # HF style: (B, 1, 1, S) additive, the last positions padded out in sample 0
        m = torch.zeros(B, 1, 1, S, dtype=dtype)
        m[0, ..., -3:] = torch.finfo(dtype).min
        return m
    if kind == "float":
        return torch.randn(B, 1, L, S, dtype=dtype, generator=g)
    if kind == "bool":
        m = torch.rand(B, 1, L, S, generator=g) > 0.3
        m[0, 0, 2] = False  # a row with nothing to attend to: zeros, as in SDPA
        return m
    return None


@pytest.mark.parametrize("chunk_bytes", [attention.CHUNK_BYTES, 1], ids=["default-chunks", "one-slice-per-chunk"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_attention_is_sdpa_math_given_the_same_dropout_mask(case, chunk_bytes, monkeypatch):
    B, H, L, S, E, kind, causal, scale, Hkv = CASES[case]
    monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
    if chunk_bytes == 1:  # the test really runs many chunks (over batch and heads)
        assert len(list(attention.chunk_indices((B, H), L * S * 8))) == B * H
    q, k, v = _qkv(B, H, L, S, E, Hkv=Hkv)
    mask = _mask(kind, B, L, S, q.dtype)
    out, ref, grads, ref_grads = _against_math(q, k, v, mask, 0.2, causal, scale, Hkv is not None)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    for g, r, name in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=lambda m: f"d{name}: {m}")
    if kind == "bool":
        assert torch.count_nonzero(out[0, :, 2]) == 0


def test_fp32_output_has_the_bits_of_sdpa_dropping_with_the_same_mask():
    q, k, v = _qkv(4, 6, 16, 16, 8, dtype=torch.float32)
    mask = _mask("padding", 4, 16, 16, torch.float32)
    out, ref, grads, ref_grads = _against_math(q, k, v, mask, 0.1)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # F.scaled_dot_product_attention's own dropout is `probs * noise` (aten.dropout), then `@ v`
    torch.manual_seed(7)
    noise = keep_mask((4, 6, 16, 16), 0.1).float().div_(0.9)
    probs = math_sdpa(q, k, v, mask)[1]
    assert torch.equal(out, (probs * noise) @ v)
    out0 = chunked_attention(q, k, v, mask, 0.0)
    torch.testing.assert_close(out0, F.scaled_dot_product_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_fp32(dtype):
    q, k, v = _qkv(2, 3, 8, 8, 8, dtype=torch.float32)
    qh, kh, vh = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    torch.manual_seed(1)
    out = chunked_attention(qh, kh, vh, None, 0.1)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert qh.grad.dtype == dtype and torch.isfinite(qh.grad.float()).all()
    torch.manual_seed(1)  # reference: the fp32 math on the rounded inputs, rounded once at the end
    ref = math_sdpa(*(t.detach().float() for t in (qh, kh, vh)), None, 0.1, False,
                    keep_mask((2, 3, 8, 8), 0.1))[0].to(dtype)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = _qkv(2, 2, 6, 6, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_attention(q, k, v, None, 0.1)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32


def _saved_bytes(fn):
    """Bytes of every floating-point tensor autograd saves for the backward while fn runs, largest first."""
    sizes = []

    def pack(t):
        if t.is_floating_point():
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(sizes, reverse=True)


def test_nothing_of_shape_batch_heads_L_S_is_saved_for_the_backward():
    B, H, L, E = 4, 6, 128, 16
    q, k, v = _qkv(B, H, L, L, E, dtype=torch.float32)
    mask = _mask("padding", B, L, L, torch.float32)
    scores = B * H * L * L * 4
    sdpa = _saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1))
    assert sdpa[0] >= scores  # the test can fail: SDPA's math path keeps (B, H, L, S) floats
    ours = _saved_bytes(lambda: chunked_attention(q, k, v, mask, 0.1))
    assert max(ours) < scores / 4, ours
    assert sum(ours) == sum(t.numel() * 4 for t in (q, k, v, mask))


def test_module_uses_sdpa_in_eval_and_for_a_mask_that_needs_a_gradient():
    m = AttentionWithDropout(0.1)
    q, k, v = _qkv(2, 2, 5, 5, 4)
    mask = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask), rtol=0, atol=0)
    m.train()
    torch.manual_seed(0)
    a = m(q, k, v, mask)
    torch.manual_seed(0)
    assert torch.equal(a, chunked_attention(q, k, v, mask, 0.1))
    assert not torch.equal(a, m(q, k, v, mask))  # dropout is on
    learned = mask.clone().requires_grad_()
    m(q, k, v, learned).sum().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0


def test_bad_arguments_are_refused():
    q, k, v = _qkv(1, 1, 3, 3, 2)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        chunked_attention(q, k, v, torch.zeros(3, 3, dtype=q.dtype), 0.1, True)
    with pytest.raises(ValueError, match=r"dropout_p=1.0 must be in \[0, 1\)"):
        chunked_attention(q, k, v, None, 1.0)


def test_compiled_attention_keeps_the_bound_and_draws_the_eager_masks():
    """Under torch.compile the chunked Function runs eagerly behind a graph break: the same chunks (no
    (B, H, L, S) tensor kept for the backward; traced, it was one chunk) and the same masks as eager."""
    B, H, L, E = 4, 6, 128, 16
    q, k, v = _qkv(B, H, L, L, E, dtype=torch.float32)
    mask = _mask("padding", B, L, L, torch.float32)
    fn = torch.compile(lambda q, k, v, m: chunked_attention(q, k, v, m, 0.1), options={"fallback_random": True})
    torch.manual_seed(2)
    saved = _saved_bytes(lambda: fn(q, k, v, mask))
    assert max(saved) < B * H * L * L * 4 / 4, saved
    torch.manual_seed(2)
    out = fn(q, k, v, mask)
    torch.manual_seed(2)
    ref = chunked_attention(q, k, v, mask, 0.1)
    assert torch.equal(out, ref)
    g, g_ref = (torch.autograd.grad(o.sum(), q)[0] for o in (out, ref))
    assert torch.equal(g, g_ref)
