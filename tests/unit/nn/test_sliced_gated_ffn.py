"""sliced_gated_ffn: a gated FFN in slices of its intermediate width — the FFN's numbers, one slice's tensors
alive at a time, and d x made during the recompute when the cotangent is handed over ahead."""
import pytest
import torch
import torch.nn.functional as F

from meft_fx.memory import measure_step_memory
from meft_fx.nn import sliced_ffn as sliced
from meft_fx.nn.gated import ACTIVATIONS
from meft_fx.nn.sliced_ffn import cotangent_ahead, slices_for, sliced_gated_ffn

EAGER = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
WIDTH, INNER = 16, 40


def _weights(dtype, seed=0, width=WIDTH, inner=INNER):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) / s[1] ** 0.5 for s in ((inner, width), (inner, width), (width, inner))]


def _plain(x, wg, wu, wd, kind):
    return F.linear(EAGER[kind](F.linear(x, wg)) * F.linear(x, wu), wd)


def _budget(x, units):
    """chunk_bytes giving slices of `units` intermediate units for input x."""
    return (x.numel() // x.shape[-1]) * x.element_size() * units


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(2, 9, WIDTH), (1, 1, WIDTH), (5, WIDTH)])
def test_output_and_input_gradient_are_the_ffns(kind, shape):
    wg, wu, wd = _weights(torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref = _plain(x, wg, wu, wd, kind)
    cot = torch.randn_like(ref)
    d_ref, = torch.autograd.grad(ref, x, cot)
    budget = _budget(x, 12)  # 4 slices: 12, 12, 12, 4 units
    with torch.no_grad():
        forward = sliced_gated_ffn(x, wg, wu, wd, kind, budget)
    plain = sliced_gated_ffn(x, wg, wu, wd, kind, budget)  # no cotangent ahead: recomputed in the backward
    d_plain, = torch.autograd.grad(plain, x, cot)
    with cotangent_ahead(cot):
        ahead = sliced_gated_ffn(x, wg, wu, wd, kind, budget)
    d_ahead, = torch.autograd.grad(ahead, x, cot)
    assert forward.shape == ref.shape
    torch.testing.assert_close(forward, ref, rtol=1e-12, atol=1e-12)
    # the forward and every recompute give the same bits: a reversible stack rebuilds its inputs from them
    assert torch.equal(plain, forward) and torch.equal(ahead, forward)
    torch.testing.assert_close(d_plain, d_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_ahead, d_ref, rtol=1e-12, atol=1e-12)


def test_the_cotangent_handed_ahead_saves_the_backward_its_recompute(monkeypatch):
    wg, wu, wd = _weights(torch.float64)
    x = torch.randn(3, 7, WIDTH, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(3, 7, WIDTH, dtype=torch.float64)
    budget = _budget(x, 10)
    passes = []
    real = sliced._forward_and_vjp
    monkeypatch.setattr(sliced, "_forward_and_vjp", lambda *a: passes.append(1) or real(*a))
    with cotangent_ahead(cot):
        out = sliced_gated_ffn(x, wg, wu, wd, "silu", budget)
    d_ahead, = torch.autograd.grad(out, x, cot)
    assert passes == [1]  # one pass over the slices: the output and d x together
    # another gradient than the one handed over: recomputed from it, not the d x made ahead
    with cotangent_ahead(cot):
        out = sliced_gated_ffn(x, wg, wu, wd, "silu", budget)
    d_other, = torch.autograd.grad(out, x, 2 * cot)
    assert passes == [1, 1, 1]
    torch.testing.assert_close(d_other, 2 * d_ahead, rtol=1e-12, atol=1e-12)
    # a cotangent of another shape is not taken
    with cotangent_ahead(torch.ones(4)):
        out = sliced_gated_ffn(x, wg, wu, wd, "silu", budget)
    torch.autograd.grad(out, x, cot)
    assert passes == [1, 1, 1, 1]


def test_trainable_weights_or_one_slice_run_the_plain_ops():
    wg, wu, wd = _weights(torch.float64)
    x = torch.randn(2, 5, WIDTH, dtype=torch.float64, requires_grad=True)
    wd.requires_grad_()
    out = sliced_gated_ffn(x, wg, wu, wd, "gelu", _budget(x, 8))
    assert out.grad_fn.name() != "SlicedGatedFFNBackward"
    ref = _plain(x, wg, wu, wd, "gelu")
    for a, b in zip(torch.autograd.grad(out, [x, wd], torch.ones_like(out)),
                    torch.autograd.grad(ref, [x, wd], torch.ones_like(ref))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the same choice without grad: the forward and its recompute agree
        assert torch.equal(sliced_gated_ffn(x, wg, wu, wd, "gelu", _budget(x, 8)), out)
    wd.requires_grad_(False)
    one = sliced_gated_ffn(x, wg, wu, wd, "gelu", _budget(x, INNER))
    assert one.grad_fn.name() != "SlicedGatedFFNBackward"


def test_slices_cover_the_width_within_the_budget():
    for tokens, width, budget in [(1024, 1376, 3 << 20), (7, 40, 7 * 4 * 12), (3, 10, 1), (5, 11, 10 ** 9)]:
        s = slices_for(tokens, width, 4, budget)
        assert [u for sl in s for u in range(sl.start, sl.stop)] == list(range(width))
        assert all(tokens * 4 * (sl.stop - sl.start) <= max(budget, tokens * 4) for sl in s)
        assert len({sl.stop - sl.start for sl in s[:-1]}) <= 1 and s[-1].stop - s[-1].start <= s[0].stop - s[0].start
    assert [sl.stop - sl.start for sl in slices_for(1024, 1376, 4, 3 << 20)] == [688, 688]
    with pytest.raises(ValueError, match="kind='relu'"):
        sliced_gated_ffn(torch.ones(2, WIDTH), *_weights(torch.float32), "relu")


def test_one_slice_of_intermediate_tensors_is_alive_at_a_time():
    """The recompute + back-propagation of 4 slices peaks at about a quarter of the plain FFN's intermediates."""
    wg, wu, wd = _weights(torch.float32, width=64, inner=512)
    x = torch.randn(4, 256, 64, requires_grad=True)
    cot = torch.randn(4, 256, 64)
    inner_mib = x.numel() // 64 * 512 * 4 / 2 ** 20  # one intermediate tensor of all tokens: 2 MiB

    def plain():
        torch.autograd.grad(_plain(x, wg, wu, wd, "silu"), x, cot)

    def ahead():
        with cotangent_ahead(cot):
            out = sliced_gated_ffn(x, wg, wu, wd, "silu", _budget(x, 128))
        torch.autograd.grad(out, x, cot)

    p, a = measure_step_memory(plain).peak_mib, measure_step_memory(ahead).peak_mib
    assert p > 3 * inner_mib and a < 2 * inner_mib, (p, a)


def test_bf16_rows_match_the_ffn_within_rounding():
    wg, wu, wd = _weights(torch.bfloat16)
    x = torch.randn(2, 6, WIDTH).to(torch.bfloat16).requires_grad_()
    cot = torch.randn(2, 6, WIDTH).to(torch.bfloat16)
    with cotangent_ahead(cot):
        out = sliced_gated_ffn(x, wg, wu, wd, "silu", _budget(x, 10))
    d, = torch.autograd.grad(out, x, cot)
    ref = _plain(x, wg, wu, wd, "silu")
    d_ref, = torch.autograd.grad(ref, x, cot)
    assert out.dtype == d.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(d, d_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("ahead", [True, False])
def test_under_autocast_it_computes_what_the_ffn_computes_there(ahead):
    wg, wu, wd = _weights(torch.float32)
    x = torch.randn(2, 6, WIDTH, requires_grad=True)
    cot = torch.randn(2, 6, WIDTH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(x, wg, wu, wd, "silu")
        with cotangent_ahead(cot if ahead else None):
            out = sliced_gated_ffn(x, wg, wu, wd, "silu", _budget(x, 10))
    assert out.dtype == ref.dtype == torch.bfloat16
    d, = torch.autograd.grad(out, x, cot.to(out.dtype))
    d_ref, = torch.autograd.grad(ref, x, cot.to(ref.dtype))
    assert d.dtype == d_ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(d, d_ref, rtol=3e-2, atol=3e-2)
