import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meft_fx import passes
from meft_fx.nn.gated import gated_act
from helpers import captured

aten = torch.ops.aten


class GatedFFN(nn.Module):
    """LLaMA's MLP (down(act(gate(x)) * up(x))), with the activation and the product's operand order to choose."""

    def __init__(self, act=F.silu, swap=False, reuse=False, width=16, inner=48):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(width, inner), nn.Linear(width, inner), nn.Linear(inner, width)
        self.act, self.swap, self.reuse = act, swap, reuse

    def forward(self, x):
        a = self.act(self.gate(x))
        h = self.up(x) * a if self.swap else a * self.up(x)
        out = self.down(h)
        return out + a.sum(-1, keepdim=True) if self.reuse else out  # `reuse`: the activation feeds more than the product


def _run(gm, x):
    out = gm(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out, torch.autograd.grad(out, [x, *gm.parameters()], torch.ones_like(out))


@pytest.mark.parametrize("act,kind", [(F.silu, "silu"), (F.gelu, "gelu"),
                                      (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh")])
@pytest.mark.parametrize("swap", [False, True])
def test_gated_products_become_gated_act_with_the_same_bits(act, kind, swap):
    torch.manual_seed(0)
    model = GatedFFN(act, swap)
    x = torch.randn(2, 5, 16, requires_grad=True)
    gm, _ = captured(model, (x,), prepare=False)
    ref, ref_grads = _run(gm, x)
    gm = passes.gated_activation(gm)
    calls = [n for n in gm.graph.nodes if n.target is gated_act]
    assert len(calls) == 1 and calls[0].args[2] == kind and calls[0].meta["meft_pass"] == "gated_activation"
    assert not any(n.target in (aten.silu.default, aten.gelu.default) for n in gm.graph.nodes)
    out, grads = _run(gm, x)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


def test_an_activation_used_elsewhere_or_an_ungated_one_is_left_alone():
    for model in (GatedFFN(reuse=True), nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8))):
        x = torch.randn(2, 5, model[0].in_features if isinstance(model, nn.Sequential) else 16)
        gm, _ = captured(model, (x,), prepare=False)
        before = [n.target for n in gm.graph.nodes]
        gm = passes.gated_activation(gm)
        assert [n.target for n in gm.graph.nodes] == before
