"""chunk_head_loss: a vocabulary head feeding a cross-entropy becomes one ChunkedHeadLoss call."""
import torch
import torch.nn.functional as F
from torch import nn

from meft_fx.nn.head_loss import ChunkedHeadLoss
from meft_fx.passes import chunk_head_loss, find_head_losses
from tests.support.architectures import PostNormTransformer, PreNormTransformer, _token_inputs
from tests.support.helpers import captured

aten = torch.ops.aten


def _llama(vocab=2048):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _heads(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChunkedHeadLoss)]


def test_llama_head_and_loss_become_one_call_and_the_logits_op_is_gone():
    model = _llama()
    gm, tensors = captured(model, _token_inputs(0, 2, 9, vocab=2048))
    assert [m.reason for m in find_head_losses(gm)] == [""]
    gm = chunk_head_loss(gm, chunk_bytes=64 * 1024)
    (call,) = _heads(gm)
    assert call.meta["meft_pass"] == "chunk_head_loss"
    assert call.args[1].target.endswith("lm_head.weight")  # the head's weight goes in, not its logits
    assert not any(n.target == aten.cross_entropy_loss.default for n in gm.graph.nodes)
    assert not any(n.target == aten.linear.default and n.args[1] is call.args[1] for n in gm.graph.nodes)
    mod = gm.get_submodule(call.target)
    assert (mod.logits_dtype, mod.ignore_index, mod.reduction) == (None, -100, "mean")
    gm.train()
    out = gm(*tensors)
    assert out.logits is None and out.loss.grad_fn is not None


def test_prenorm_lm_head_is_chunked_with_its_ignore_index():
    torch.manual_seed(0)
    gm, tensors = captured(PreNormTransformer(vocab_size=2048), _token_inputs(0, 2, 8, vocab=2048))
    (m,) = find_head_losses(gm)
    assert m.reason == "" and m.options["ignore_index"] == -100
    torch.manual_seed(1)  # the same dropout masks in both runs
    ref = gm(*tensors)["loss"]
    gm = chunk_head_loss(gm, chunk_bytes=3 * 2048 * 4)
    assert len(_heads(gm)) == 1
    torch.manual_seed(1)
    out = gm(*tensors)
    assert out["logits"] is None
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-6)


def test_a_small_classifier_is_left_alone_with_the_reason():
    torch.manual_seed(0)
    gm, _ = captured(PostNormTransformer(), _token_inputs(0, 2, 8, labels="cls"))
    (m,) = find_head_losses(gm)
    assert "3 classes" in m.reason
    code = gm.code
    assert chunk_head_loss(gm).code == code


class _LogitsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(2048, 16)
        self.head = nn.Linear(16, 2048)

    def forward(self, ids, labels):
        logits = self.head(self.emb(ids))
        return F.cross_entropy(logits.view(-1, 2048), labels.view(-1)), logits.argmax(-1)


def test_logits_used_by_something_else_are_not_chunked():
    gm, _ = captured(_LogitsTwice(), (torch.randint(0, 2048, (2, 5)), torch.randint(0, 2048, (2, 5))))
    (m,) = find_head_losses(gm)
    assert "also feed" in m.reason
    assert not _heads(chunk_head_loss(gm))
