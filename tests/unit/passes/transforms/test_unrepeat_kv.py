import pytest
import torch
import torch.nn.functional as F

from meft_fx import passes
from helpers import captured

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class GroupedAttention(torch.nn.Module):
    """transformers' repeat_kv + SDPA with a mask (what LLaMA's sdpa attention runs when given a mask)."""

    def __init__(self, heads=4, kv_heads=2, dim=8, rep_v=None):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.rep_v = rep_v or heads // kv_heads
        self.q = torch.nn.Linear(heads * dim, heads * dim)
        self.kv = torch.nn.Linear(heads * dim, 2 * kv_heads * dim)

    @staticmethod
    def repeat(x, n):
        b, h, length, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, length, d).reshape(b, h * n, length, d)

    def forward(self, x, mask):
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.heads, self.dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2 * self.kv_heads, self.dim).transpose(1, 2).chunk(2, dim=1)
        if self.rep_v != self.heads // self.kv_heads:  # not grouped-query attention: v repeated otherwise
            v = v[:, :1]
        out = F.scaled_dot_product_attention(q, self.repeat(k, self.heads // self.kv_heads),
                                             self.repeat(v, self.rep_v), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, -1)


def _inputs(batch=2, length=7, width=32):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).clone()
    mask[0, :, :, :2] = False  # a padded row
    mask[0, :, :2, 0] = True
    return torch.randn(batch, length, width, generator=g), mask


def test_repeated_key_value_heads_become_enable_gqa_with_the_same_bits():
    torch.manual_seed(0)
    model = GroupedAttention()
    x, mask = _inputs()
    gm, tensors = captured(model, {"x": x, "mask": mask}, prepare=False)
    assert any(n.target == aten.expand.default for n in gm.graph.nodes)
    ref = gm(*tensors)
    gm = passes.unrepeat_kv(gm)
    sdpa = list(gm.graph.find_nodes(op="call_function", target=SDPA))
    assert len(sdpa) == 1 and sdpa[0].kwargs["enable_gqa"] is True
    assert sdpa[0].meta["meft_pass"] == "unrepeat_kv"
    assert not any(n.target == aten.expand.default for n in gm.graph.nodes), "the repeat is erased"
    # the key/value SDPA reads have kv_heads heads now
    assert [tuple(a.meta["val"].shape)[1] for a in sdpa[0].args[1:3]] == [2, 2]
    assert torch.equal(gm(*tensors), ref)
    # other shapes than the example: batch 1, sequence 1
    for b, length in ((1, 7), (3, 1)):
        x2, m2 = _inputs(b, length)
        assert torch.equal(gm(x2, m2), model(x2, m2))


def test_a_repeat_that_is_not_grouped_query_attention_stays():
    """Value heads repeated a different number of times than key heads: not GQA's layout, left alone."""
    torch.manual_seed(0)
    model = GroupedAttention(rep_v=4)
    x, mask = _inputs()
    gm, tensors = captured(model, {"x": x, "mask": mask}, prepare=False)
    before = gm.code
    gm = passes.unrepeat_kv(gm)
    assert gm.code == before
    assert not list(gm.graph.find_nodes(op="call_function", target=SDPA))[0].kwargs.get("enable_gqa")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_enable_gqa_is_repeat_kv_to_the_bit(dtype):
    """The pass rests on this: SDPA's enable_gqa reads head j // n_rep, which repeat_kv copies to head j."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 33, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 2, 33, 16, generator=g, dtype=dtype) for _ in range(2))
    mask = torch.rand(2, 1, 33, 33, generator=g) > 0.3
    mask[..., 0] = True
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rep = GroupedAttention.repeat
    ref = F.scaled_dot_product_attention(q, rep(k, 4), rep(v, 4), attn_mask=mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(out, ref)
    # gradients: dq to the bit; dk, dv the same sums over a group's heads in another order
    d_out = torch.randn(ref.shape, generator=g, dtype=dtype)
    want, got = torch.autograd.grad(ref, (q, k, v), d_out), torch.autograd.grad(out, (q, k, v), d_out)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(dtype).eps * float(b.abs().max()))
