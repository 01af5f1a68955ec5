"""grouped_experts: transformers' traced grouped product of routed experts becomes meft_fx's grouped_mm, with the
same loss and gradient bits (every weight trainable here, so both gradients are computed)."""
import torch

from meft_fx import passes
from meft_fx.nn.experts import grouped_mm
from architectures import make
from helpers import captured


def _loss_and_grads(gm, tensors, params):
    loss = gm(*tensors).loss
    return loss, torch.autograd.grad(loss, params)


def test_the_fallback_product_becomes_grouped_mm_with_the_same_bits():
    arch = make("mixtral", dtype=torch.float32)
    arch.model.set_experts_implementation("grouped_mm")
    arch.model.eval()
    gm, tensors = captured(arch.model, arch.make_inputs(2, 7), prepare=False)
    before = passes.run_pipeline(gm, until="gated_activation").gm
    params = [p for p in before.parameters() if p.requires_grad]
    ref = _loss_and_grads(before, tensors, params)
    fallback = sum(str(n.target) == "transformers.grouped_mm_fallback.default" for n in before.graph.nodes)
    assert fallback == 2 * arch.num_layers  # gate/up and down, per layer
    after = passes.grouped_experts(before)
    assert sum(n.target is grouped_mm for n in after.graph.nodes) == fallback
    assert not any(str(n.target).startswith("transformers.") for n in after.graph.nodes)
    loss, grads = _loss_and_grads(after, tensors, params)
    assert torch.equal(loss, ref[0])
    assert all(torch.equal(a, b) for a, b in zip(grads, ref[1]))
