"""chunk_loss (standalone) and convert's default chunked head: same loss and gradients, no full logits."""
import copy

import pytest
import torch

import meft_fx
from meft_fx.chunked_loss import STATE, unchunked
from tests.support.architectures import PreNormTransformer, _token_inputs

VOCAB = 2048
CHUNK = 5 * VOCAB * 4  # five rows of fp32 logits per chunk


def _decoder(kind):
    import transformers as tf
    small = dict(vocab_size=VOCAB, use_cache=False)
    cfg = {"llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, **small),
           "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **small)}[kind]()
    torch.manual_seed(0)
    model = getattr(tf, {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind])(cfg)
    return model.double().eval()


def _grads(model, inputs):
    torch.manual_seed(7)  # dropout (GPT-2 has it on) draws the same masks for every model compared
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss if hasattr(out, "loss") else out["loss"], params)


CALLS = [(2, 9, True), (1, 1, True), (4, 6, False), (1, 7, True)]  # (batch, seq, padded-with-mask)


@pytest.mark.parametrize("kind", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_chunk_loss_gives_the_model_s_loss_and_gradients_for_calls_of_every_shape(kind):
    ref = _decoder(kind)
    chunked = meft_fx.chunk_loss(copy.deepcopy(ref), chunk_bytes=CHUNK)
    assert type(chunked).__name__ == type(ref).__name__ and isinstance(chunked, type(ref))
    for batch, seq, masked in CALLS:
        inputs = _token_inputs(batch, batch, seq, vocab=VOCAB)
        if not masked:
            inputs.pop("attention_mask")
        for m in (ref, chunked):
            m.train()
        (r, gr), (o, go) = _grads(ref, inputs), _grads(chunked, inputs)
        assert o.logits is None  # training: the logits were never built
        torch.testing.assert_close(o.loss, r.loss, rtol=1e-6, atol=1e-7, equal_nan=True)
        for a, b in zip(gr, go):  # HF computes the loss in float32: agreement to float32 rounding
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, equal_nan=True)  # summation order: ~3e-8
    chunked.eval()
    inputs = _token_inputs(0, 2, 9, vocab=VOCAB)
    with torch.no_grad():
        e, r = chunked(**inputs), ref.eval()(**inputs)
    assert torch.equal(e.logits, r.logits) and torch.equal(e.loss, r.loss)


def test_training_calls_without_labels_run_the_original_forward_with_logits():
    model = meft_fx.chunk_loss(_decoder("llama").train(), chunk_bytes=CHUNK)
    inputs = _token_inputs(0, 2, 9, vocab=VOCAB)
    inputs.pop("labels")
    out = model(**inputs)
    assert out.logits.shape == (2, 9, VOCAB)
    assert len(model.__dict__[STATE].plain) == 1


def test_chunk_loss_refuses_a_model_without_a_vocabulary_head():
    from tests.support.architectures import PostNormTransformer
    with pytest.raises(ValueError, match="no vocabulary head"):
        meft_fx.chunk_loss(PostNormTransformer(), example_inputs=_token_inputs(0, 2, 8, labels="cls"))
    with pytest.raises(ValueError, match="chunk_bytes"):
        meft_fx.chunk_loss(_decoder("llama"), chunk_bytes=0)


@pytest.mark.slow
def test_convert_chunks_the_head_by_default_and_changes_no_gradient():
    rev = meft_fx.convert(_decoder("llama"), meft_fx.MEFTConfig(loss_chunk_bytes=CHUNK)).train()
    assert STATE in rev.__dict__
    assert "vocabulary head + cross-entropy after model" in str(meft_fx.explain(rev, estimate_memory=False))
    for batch, seq, _ in CALLS[:2]:
        inputs = _token_inputs(batch, batch, seq, vocab=VOCAB)
        o, go = _grads(rev, inputs)
        with unchunked(rev):  # the model's own head and loss, same adapters
            r, gr = _grads(rev, inputs)
        assert STATE in rev.__dict__
        assert o.logits is None and r.logits is not None
        torch.testing.assert_close(o.loss, r.loss, rtol=1e-6, atol=1e-7, equal_nan=True)
        for a, b in zip(gr, go):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, equal_nan=True)  # summation order: ~3e-8


def test_a_causal_lm_trains_with_the_programs_convert_made():
    """The chunked loss's training forward calls the stack's owner with use_cache=False where convert's
    example call passed nothing: the same call (the config says no cache), so no second capture, and
    the programs `graphs()` shows are the ones the training step runs."""
    from meft_fx.conversion import ConvertedModule

    rev = meft_fx.convert(_decoder("llama"), meft_fx.MEFTConfig(loss_chunk_bytes=CHUNK)).train()
    owner = next(m for m in rev.modules() if isinstance(m, ConvertedModule))
    ran = []
    hook = meft_fx.graphs(rev)["coupling0/backward"].register_forward_hook(lambda *a: ran.append(1))
    try:
        rev(**_token_inputs(2, 2, 9, vocab=VOCAB)).loss.backward()
    finally:
        hook.remove()
    assert owner.variants == 1 and ran == [1]


@pytest.mark.slow  # ~7 s: a conversion and a chunk_loss capture
def test_gradient_checkpointing_enable_on_a_converted_model_warns_and_claims_nothing():
    rev = meft_fx.convert(_decoder("llama"), meft_fx.MEFTConfig(chunk_loss=False))
    with pytest.warns(UserWarning, match="nothing to checkpoint"):
        rev.gradient_checkpointing_enable()
    assert not rev.is_gradient_checkpointing
    plain = meft_fx.chunk_loss(_decoder("llama"))  # not converted: checkpointing works as usual
    plain.gradient_checkpointing_enable()
    assert plain.is_gradient_checkpointing


@pytest.mark.slow
def test_convert_chunks_a_head_inside_the_converted_program():
    torch.manual_seed(0)
    base = PreNormTransformer(vocab_size=VOCAB).double()
    inputs = _token_inputs(0, 2, 8, vocab=VOCAB)
    cfg = dict(loss_chunk_bytes=CHUNK, adapter_dropout=0.0)
    rev = meft_fx.convert(base, meft_fx.MEFTConfig(**cfg), example_inputs=inputs).eval()
    plain = meft_fx.convert(base, meft_fx.MEFTConfig(chunk_loss=False, **cfg), example_inputs=inputs).eval()
    plain.load_state_dict(rev.state_dict())
    assert "meft_head_loss" in rev.graph_module.code and "meft_head_loss" not in plain.graph_module.code
    with torch.enable_grad():
        for m in (rev, plain):  # train() for the chunked path, dropout off in the model for equal numbers
            m.train()
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
        (o, go), (r, gr) = _grads(rev, inputs), _grads(plain, inputs)
    assert o["logits"] is None
    torch.testing.assert_close(o["loss"], r["loss"], rtol=1e-12, atol=1e-12)
    for a, b in zip(gr, go):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
