"""linear_cross_entropy / ChunkedHeadLoss: the chunked loss equals F.cross_entropy of the full logits."""
import pytest
import torch
import torch.nn.functional as F

from meft_fx.nn.head_loss import ChunkedHeadLoss, chunk_rows, linear_cross_entropy


def _case(seed=0, n=37, d=16, v=50, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::3] = -100
    return h, w, b, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 7 * 50 * 8, 10 ** 9])  # one row per chunk, 7 rows, everything at once
def test_equals_cross_entropy_of_the_full_logits_fp64(reduction, smoothing, chunk):
    h, w, b, t = _case()
    params = [h, w, b]
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction, label_smoothing=smoothing)
    out = linear_cross_entropy(h, w, b, t, reduction=reduction, label_smoothing=smoothing, chunk_bytes=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(torch.autograd.grad(ref * 1.7, params), torch.autograd.grad(out * 1.7, params)):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)


def test_only_tensors_that_require_grad_get_gradients_and_bias_may_be_absent():
    h, w, _, t = _case(bias=False)
    w.requires_grad_(False)
    out = linear_cross_entropy(h, w, None, t, chunk_bytes=5 * 50 * 8)
    (gh,) = torch.autograd.grad(out, [h])
    (ref,) = torch.autograd.grad(F.cross_entropy(F.linear(h, w), t), [h])
    torch.testing.assert_close(gh, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["vocab", "tokens"])
def test_every_target_ignored_gives_nan_and_zero_gradients_like_pytorch(mode):
    h, w, b, t = _case()
    t[:] = -100
    ref, out = F.cross_entropy(F.linear(h, w, b), t), linear_cross_entropy(h, w, b, t, mode=mode)
    assert torch.isnan(ref) and torch.isnan(out)
    for a, c in zip(torch.autograd.grad(ref, [h, w, b]), torch.autograd.grad(out, [h, w, b])):
        assert torch.equal(a, c) and not c.any()


@pytest.mark.parametrize("mode", ["vocab", "tokens"])
def test_logits_dtype_cast_as_hf_does_for_bf16_models(mode):
    h, w, _, t = _case(bias=False)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16()
    ref = F.cross_entropy(F.linear(hb, wb).float(), t)
    out = linear_cross_entropy(hb, wb, None, t, logits_dtype=torch.float32, chunk_bytes=4 * 50 * 4, mode=mode)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (g1,), (g2,) = torch.autograd.grad(ref, [hb]), torch.autograd.grad(out, [hb])
    assert g2.dtype == torch.bfloat16
    if mode == "tokens":  # whole rows of logits: the very ops of the unchunked loss, row by row
        assert torch.equal(g1, g2)
    else:  # summed over vocabulary blocks in float32: as close to the fp64 truth as bf16 autograd's (≤ 2×)
        hd = hb.detach().double().requires_grad_()
        (truth,) = torch.autograd.grad(F.cross_entropy(F.linear(hd, wb.double()), t), [hd])
        assert (g2.double() - truth).abs().max() <= 2 * (g1.double() - truth).abs().max() + 1e-6


def test_chunk_rows_follow_the_byte_budget():
    assert chunk_rows(32000, torch.float32, 4 * 2 ** 20) == 32
    assert chunk_rows(32000, torch.bfloat16, 4 * 2 ** 20) == 65
    assert chunk_rows(10 ** 9, torch.float32, 1) == 1


@pytest.mark.parametrize("bad, match", [(dict(reduction="none"), "reduction"), (dict(chunk_bytes=0), "chunk_bytes"),
                                        (dict(mode="rows"), "mode")])
def test_bad_arguments_are_named(bad, match):
    h, w, b, t = _case()
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, b, t, **bad)


def test_module_chunks_in_training_and_returns_logits_otherwise():
    h, w, b, t = _case()
    mod = ChunkedHeadLoss(logits_dtype=None, ignore_index=-100, label_smoothing=0.0, reduction="mean", chunk_bytes=400)
    h3, t2 = h.reshape(1, 37, 16), t.reshape(1, 37)
    loss, logits = mod.train()(h3, w, b, t2)
    assert logits is None and loss.grad_fn is not None
    loss_eval, logits = mod.eval()(h3, w, b, t2)
    ref = F.linear(h3, w, b)
    assert torch.equal(logits, ref) and torch.equal(loss_eval, F.cross_entropy(ref.reshape(-1, 50), t))
    with torch.no_grad():
        assert mod.train()(h3, w, b, t2)[1] is not None


@pytest.mark.parametrize("mode", ["vocab", "tokens"])
@pytest.mark.parametrize("reduction, smoothing", [("mean", 0.0), ("sum", 0.1), ("mean", 0.2)])
def test_both_schedules_equal_cross_entropy_with_a_trained_head(mode, reduction, smoothing):
    h, w, b, t = _case(seed=3, n=29, v=61)
    params = [h, w, b]
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction, label_smoothing=smoothing)
    out = linear_cross_entropy(h, w, b, t, reduction=reduction, label_smoothing=smoothing, chunk_bytes=29 * 8 * 7,
                               mode=mode)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(torch.autograd.grad(ref, params), torch.autograd.grad(out, params)):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction, smoothing", [("mean", 0.0), ("sum", 0.1), ("mean", 0.3)])
def test_frozen_head_one_pass_gradient_of_h_equals_autograd(reduction, smoothing):
    """A frozen head (the usual fine-tuning case): h's gradient is accumulated in the log-sum-exp pass."""
    h, w, b, t = _case(seed=5, n=33, v=70)
    w.requires_grad_(False)
    b.requires_grad_(False)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction, label_smoothing=smoothing)
    out = linear_cross_entropy(h, w, b, t, reduction=reduction, label_smoothing=smoothing, chunk_bytes=33 * 8 * 9)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (a,), (c,) = torch.autograd.grad(ref, [h]), torch.autograd.grad(out, [h])
    torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-13)
