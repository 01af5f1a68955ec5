"""sliced_ffn: a bias-free gated FFN becomes one sliced_gated_ffn call; in a converted decoder its FFN
halves run whole, sliced by width, the backward making d x while it recomputes, the gradients unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meft_fx
from meft_fx import passes
from meft_fx.nn import sliced_ffn as sliced
from meft_fx.nn.gated import gated_act
from meft_fx.nn.sliced_ffn import sliced_gated_ffn
from meft_fx.runtime import ReversibleStack
from helpers import captured
from tests.support.architectures import _token_inputs, tiny_decoder

aten = torch.ops.aten


class GatedFFN(nn.Module):
    """x + down(silu(gate(x)) * up(x)) (pre-norm residual), or LayerNorm of it (`post_norm`)."""

    def __init__(self, bias=False, reuse_gate=False, post_norm=False, width=16, inner=48):
        super().__init__()
        self.gate, self.up = nn.Linear(width, inner, bias=bias), nn.Linear(width, inner, bias=False)
        self.down = nn.Linear(inner, width, bias=False)
        self.norm = nn.LayerNorm(width) if post_norm else None
        self.reuse_gate = reuse_gate

    def forward(self, x):
        g = self.gate(x)
        out = x + self.down(F.silu(g) * self.up(x))
        out = out + g.sum(-1, keepdim=True) if self.reuse_gate else out
        return self.norm(out) if self.norm is not None else out


def _gated(model, x):
    gm, _ = captured(model, (x,), prepare=False)
    return passes.gated_activation(gm)


def test_a_bias_free_gated_ffn_becomes_one_sliced_call():
    torch.manual_seed(0)
    model = GatedFFN().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    gm = _gated(model, x)
    ref = gm(x)[0]
    taken = passes.sliced_ffn(gm, 10 * 8 * 12)
    calls = [n for n in gm.graph.nodes if n.target is sliced_gated_ffn]
    assert len(calls) == 1 and calls[0].meta["meft_pass"] == "sliced_ffn" and calls[0].args[4:] == ("silu", 960)
    assert not any(n.target in (gated_act, aten.linear.default) for n in gm.graph.nodes)
    assert taken == {calls[0].args[i].target for i in (1, 2, 3)}
    assert sorted(t.rsplit(".", 2)[-2] for t in taken) == ["down", "gate", "up"]
    torch.testing.assert_close(gm(x)[0], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(bias=True), dict(reuse_gate=True), dict(post_norm=True)])
def test_a_biased_shared_or_post_norm_ffn_is_left_alone(kw):
    """post_norm: the FFN's gradient is not its half's cotangent (a LayerNorm lies between), so the cotangent
    offered ahead would be wasted work; the FFN keeps its token chunks."""
    model = GatedFFN(**kw)
    x = torch.randn(2, 5, 16)
    gm = _gated(model, x)
    before = gm.code
    assert passes.sliced_ffn(gm, 64) == set() and gm.code == before


def _grads(model, inputs):
    torch.manual_seed(7)  # the adapters' dropout: the same masks for both models
    loss = model(**inputs).loss
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return loss, dict(zip([n for n, _ in params], torch.autograd.grad(loss, [p for _, p in params])))


def _converted(family, budget, method="meft3", **extra):
    """(converted, its reversible=False twin, the stack) of a tiny decoder, chunk_loss off."""
    config = dict(recompute_chunk_bytes=budget, chunk_loss=False, method=method)
    ref = meft_fx.convert(tiny_decoder(family, **extra), meft_fx.MEFTConfig(reversible=False, **config)).train()
    rev = meft_fx.convert(tiny_decoder(family, **extra), meft_fx.MEFTConfig(**config)).train()
    return rev, ref, next(m for m in rev.modules() if isinstance(m, ReversibleStack))


def _assert_one_pass_and_same_grads(rev, ref, stack, monkeypatch, skipped=0):
    """One pass over the slices per coupling — each recompute back-propagated as it ran (a recompute in the
    FFN's own backward, had the cotangent not been its output's, would add one more) — and the twin's grads.
    `skipped`: couplings whose FFN needs no backward at all (it only runs: none of its inputs needs a gradient)."""
    inputs = _token_inputs(3, 2, 9, vocab=128)
    passes_over_slices = []
    real = sliced._forward_and_vjp
    monkeypatch.setattr(sliced, "_forward_and_vjp", lambda *a: passes_over_slices.append(1) or real(*a))
    loss, grads = _grads(rev, inputs)
    assert len(passes_over_slices) == len(stack.couplings) - skipped
    ref_loss, ref_grads = _grads(ref, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-8, atol=1e-11, msg=name)


def test_a_converted_decoder_slices_its_ffns_and_keeps_its_gradients(monkeypatch):
    # 18 fp64 tokens: the hidden width (32) fits whole, the FFN's 64 units in 2 slices
    rev, ref, stack = _converted("Llama", 2 * 9 * 8 * 32)
    for c in stack.couplings:
        assert sum(n.target is sliced_gated_ffn for n in c.G.graph.nodes) == 1
        assert (c.chunks["G"].width, c.chunks["G"].compiled_width) == (32, 64)  # whole tokens eager; FFN width compiled
    assert "the gated FFN of 2 of them in slices of its intermediate width" in str(meft_fx.explain(rev))
    _assert_one_pass_and_same_grads(rev, ref, stack, monkeypatch)


class FusedGatedFFN(nn.Module):
    """x + down(silu(gate) * up), gate, up = gate_up(x).chunk(2, -1) (Phi-3's fused projection)."""

    def __init__(self, width=16, inner=48, rows=None):
        super().__init__()
        self.gate_up = nn.Linear(width, rows or 2 * inner, bias=False)
        self.down = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(up * F.silu(gate))


def test_a_fused_gate_up_projection_is_sliced_through_views_of_its_weight():
    torch.manual_seed(0)
    model, x = FusedGatedFFN().double(), torch.randn(2, 5, 16, dtype=torch.float64)
    gm = _gated(model, x)
    run = lambda: (lambda out: out[0] if isinstance(out, (tuple, list)) else out)(gm(x))  # noqa: E731
    ref = run()
    torch.testing.assert_close(ref, model(x), rtol=1e-12, atol=1e-12)
    assert passes.sliced_ffn(gm, 64) == {"mod.gate_up.weight", "mod.down.weight"}
    (call,) = [n for n in gm.graph.nodes if n.target is sliced_gated_ffn]
    w_gate, w_up = call.args[1:3]
    assert [(w.target, w.args[1:]) for w in (w_gate, w_up)] == [(aten.slice.Tensor, (0, 0, 48)),
                                                                (aten.slice.Tensor, (0, 48, 96))]
    assert not any(n.target in (aten.chunk.default, gated_act) for n in gm.graph.nodes)
    torch.testing.assert_close(run(), ref, rtol=1e-12, atol=1e-12)


def test_a_converted_phi3_slices_its_fused_ffns_and_keeps_its_gradients(monkeypatch):
    rev, ref, stack = _converted("Phi3", 2 * 9 * 8 * 32)  # the FFN's 64 units in 2 slices
    for c in stack.couplings:
        assert sum(n.target is sliced_gated_ffn for n in c.G.graph.nodes) == 1
    _assert_one_pass_and_same_grads(rev, ref, stack, monkeypatch)


class ScaledGatedFFN(GatedFFN):
    """x + c · down(silu(gate(x)) * up(x)): a scaled residual branch (Granite's residual_multiplier)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x)) * self.scale


def test_a_scaled_residual_branch_is_sliced_with_its_cotangent_scaled():
    torch.manual_seed(0)
    model, x = ScaledGatedFFN(0.25).double(), torch.randn(2, 5, 16, dtype=torch.float64)
    gm = _gated(model, x)
    passes.sliced_ffn(gm, 64)
    (call,) = [n for n in gm.graph.nodes if n.target is sliced_gated_ffn]
    assert call.args[4:] == ("silu", 64, 0.25)  # the factor the offered cotangent is multiplied by
    assert [n.target for n in call.users] == [aten.mul.Tensor]  # the branch still scales the output


def test_a_converted_granite_back_propagates_its_scaled_ffns_as_it_recomputes(monkeypatch):
    rev, ref, stack = _converted("Granite", 2 * 9 * 8 * 32, residual_multiplier=0.22)
    for c in stack.couplings:
        (call,) = [n for n in c.G.graph.nodes if n.target is sliced_gated_ffn]
        assert call.args[-1] == 0.22
    _assert_one_pass_and_same_grads(rev, ref, stack, monkeypatch)  # the scaled cotangent was the FFN's own


@pytest.mark.parametrize("method, half", [("meft1", "F"), ("meft2", "G")])
def test_a_whole_layer_half_slices_its_ffn_and_keeps_its_gradients(monkeypatch, method, half):
    """MEFT1/2: the whole layer is one half, not position-wise (it holds the attention), so it runs whole; its gated
    FFN still runs in slices, back-propagated as the backward recomputes it (the FFN's output reaches the layer's
    output by additions). Without it the FFN's activations of every token stay alive with the attention's."""
    rev, ref, stack = _converted("Llama", 2 * 9 * 8 * 32, method=method)
    for c in stack.couplings:
        assert half not in c.chunks  # runs whole
        assert sum(n.target is sliced_gated_ffn for n in getattr(c, half).graph.nodes) == 1
    assert f"the gated FFN inside {len(stack.couplings)} whole-layer halves" in str(meft_fx.explain(rev))
    # MEFT1's bottom F: nothing below the stack wants a gradient and no trainable parameter sits under its FFN
    # (the adapter is parallel to it), so its FFN only runs in the backward's recompute, sliced, without a VJP
    _assert_one_pass_and_same_grads(rev, ref, stack, monkeypatch, skipped=1 if method == "meft1" else 0)
