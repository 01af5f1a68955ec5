import torch
import torch.nn.functional as F

from meft_fx import passes
from meft_fx.nn.causal import masked_sdpa
from helpers import captured

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class Attention(torch.nn.Module):
    def __init__(self, p=0.0, heads=2, dim=8):
        super().__init__()
        self.p, self.heads, self.dim = p, heads, dim
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)

    def forward(self, x, mask):
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3 * self.heads, self.dim).transpose(1, 2).chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p)
        return out.transpose(1, 2).reshape(b, length, -1)


def _inputs(length=7, padded=False):
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(2, 1, length, length).clone()
    if padded:
        mask[0, :, :, :2] = False
        mask[0, :, :2, 0] = True
    return torch.randn(2, length, 16, generator=torch.Generator().manual_seed(0)), mask


def _out(gm, x, mask):
    out = gm(x, mask)
    return out[0] if isinstance(out, (tuple, list)) else out


def test_sdpa_with_a_boolean_mask_becomes_masked_sdpa():
    torch.manual_seed(0)
    gm, _ = captured(Attention(), dict(zip(("x", "mask"), _inputs())), prepare=False)
    cases = [_inputs(padded=False), _inputs(padded=True)]
    refs = [_out(gm, x, m) for x, m in cases]
    gm = passes.causal_masks(gm)
    calls = [n for n in gm.graph.nodes if n.target is masked_sdpa]
    assert len(calls) == 1 and calls[0].meta["meft_pass"] == "causal_masks"
    assert not list(gm.graph.find_nodes(op="call_function", target=SDPA))
    (causal, padded), (ref_causal, ref_padded) = cases, refs
    torch.testing.assert_close(_out(gm, *causal), ref_causal, rtol=1e-6, atol=1e-6)  # the causal kernel
    assert torch.equal(_out(gm, *padded), ref_padded)  # the mask, as before


def test_dropout_attention_and_float_masks_are_left_alone():
    x, mask = _inputs()
    for model, m in ((Attention(p=0.1), mask), (Attention(), torch.zeros(2, 1, 7, 7))):
        gm, _ = captured(model, {"x": x, "mask": m}, prepare=False)
        before = [n.target for n in gm.graph.nodes]
        assert [n.target for n in passes.causal_masks(gm).graph.nodes] == before
