import torch

from meft_fx import passes
from architectures import make
from helpers import captured
from meft_fx.nn.attention import AttentionWithDropout
from meft_fx.nn.dropout import Dropout

aten = torch.ops.aten


def test_dropouts_become_modules_that_follow_train_and_eval():
    arch = make("bert", dtype=torch.float64)
    model = arch.model
    inputs = arch.make_inputs(2, 7)
    inputs.pop("labels")
    gm, tensors = captured(model, inputs, prepare=False)
    assert any(n.target == aten.dropout.default for n in gm.graph.nodes)
    gm = passes.dropout_to_modules(gm)
    gm.graph.lint()
    # structure: no functional dropout left, no attention with a baked-in dropout probability
    assert not any(n.target == aten.dropout.default for n in gm.graph.nodes)
    sdpa = [n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert all((n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)) == 0 for n in sdpa)
    made = [n for n in gm.graph.nodes if n.meta.get("meft_pass") == "dropout_to_modules"]
    assert len(made) >= 2 * len(model.bert.encoder.layer)
    # numbers: eval mode equals the eager model in eval mode exactly
    model.eval(), gm.eval()
    with torch.no_grad():
        ref = model(**inputs).logits
        out = gm(*tensors).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # the made modules: meft_fx's dropout (masks from torch.rand) and attention that keeps no scores
    kinds = {type(m) for m in gm.modules()}
    assert {Dropout, AttentionWithDropout} <= kinds and torch.nn.Dropout not in kinds
    # train mode: dropout is on, follows torch.manual_seed, and differs from eval by a dropout's amount
    model.train(), gm.train()
    with torch.no_grad():
        torch.manual_seed(3)
        out = gm(*tensors).logits
        out2 = gm(*tensors).logits
        torch.manual_seed(3)
        again = gm(*tensors).logits
    assert torch.equal(out, again)
    assert not torch.equal(out, out2) and not torch.equal(out, ref)
