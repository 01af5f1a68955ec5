"""convert() end to end: every architecture × MEFT1/2/3, gradients against reversible=False."""
import copy

import pytest
import torch
from torch import nn

import meft_fx
from untraceable import Untraceable
from grads import assert_same_grads, convert_pair, grads_of, loss_of, ran_reversible, reference_twin
from architectures import ARCHITECTURES, make
from stacks import every_stack
from meft_fx import ConversionError, MEFTConfig
from meft_fx.conversion import ConvertedModule
from meft_fx.runtime import ReversibleStack

METHODS = ["meft1", "meft2", "meft3"]


@pytest.mark.slow
def test_reversible_false_config_builds_the_same_network():
    arch = make("bert", dtype=torch.float64)
    torch.manual_seed(7)
    rev = meft_fx.convert(arch.model, MEFTConfig(reversible=True))
    torch.manual_seed(7)
    ref = meft_fx.convert(arch.model, MEFTConfig(reversible=False))
    stacks = [m for m in ref.modules() if isinstance(m, ReversibleStack)]
    assert stacks and not any(m.reversible for m in stacks)
    inputs = arch.make_inputs(3, 8)
    out_rev, g_rev = grads_of(rev, inputs)
    out_ref, g_ref = grads_of(ref, inputs)
    # the reversible stack is one autograd node; the reference records every op
    assert_same_grads(g_rev, g_ref, 0)  # exact numerics (the default): bit-identical


# Fast set: MEFT3 on every architecture but BART, MEFT1 on BERT; the slow set has the other cases.
# MEFT1/2 take the whole layer as F or G, the same cut whatever the layer holds: they run on BERT
# (post-norm), LLaMA (pre-norm, rotary context), OPT (reshapes around the FFN), T5 (relative bias) and
# the fx-traced pre-norm model here, and on the six architectures of test_more_architectures; BART
# (~25 s per method) runs MEFT3 only (test time).
WHOLE_LAYER_ARCHS = ("bert", "llama", "opt", "t5_encoder", "prenorm_custom")
PAIRS = [(name, method) if (method == "meft3" and name != "bart") or (name, method) == ("bert", "meft1") else
         pytest.param(name, method, marks=pytest.mark.slow) for method in METHODS for name in ARCHITECTURES
         if method == "meft3" or name in WHOLE_LAYER_ARCHS]


@pytest.mark.parametrize("name,method", PAIRS)
def test_reversible_gradients_match_autograd_float64(name, method):
    arch = make(name, dtype=torch.float64, num_layers=2)
    # transformers models are traced from their dummy inputs; hand-written ones need examples
    rev, ref = convert_pair(arch.model, method, None if arch.hf else arch.make_inputs(3, 5))
    # structure: one coupling per transformer layer
    assert len(meft_fx.explain(rev).couplings) == arch.num_layers * arch.num_stacks
    # a batch size and sequence length different from the traced ones, dropout on
    inputs = arch.make_inputs(4, 9)
    rev.train(), ref.train()
    out_rev, g_rev = grads_of(rev, inputs)
    out_ref, g_ref = grads_of(ref, inputs)
    assert type(out_rev) is type(out_ref) is type(arch.model(**inputs))
    # the reversible runtime really ran (one autograd node per stack), the reference did not
    assert ran_reversible(loss_of(out_rev))
    assert not ran_reversible(loss_of(out_ref))
    assert_same_grads(g_rev, g_ref, 0)  # exact numerics (the default): bit-identical
    # every adapter gets a gradient; for BART's encoder it only arrives through the decoder's
    # cross-attention context, so this also checks gradients of context inputs
    adapter_params = {n for n, p in rev.named_parameters() if p.requires_grad and "meft_adapter" in n}
    assert adapter_params and all(g_rev[n].abs().sum() > 0 for n in adapter_params)


def test_other_batch_sizes_and_lengths_and_output_class():
    arch = make("bert", dtype=torch.float32)
    rev = meft_fx.convert(arch.model)
    for b, t in [(1, 3), (5, 17), (2, 40)]:
        inputs = arch.make_inputs(b, t)
        out = rev(**inputs)
        assert out.logits.shape == arch.model(**inputs).logits.shape
        assert out.loss is not None and out.loss.requires_grad
        out.loss.backward()


def test_convert_does_not_touch_the_callers_model():
    arch = make("gpt2", dtype=torch.float32)
    before = {k: v.clone() for k, v in arch.model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in arch.model.named_parameters()}
    rev = meft_fx.convert(arch.model)
    assert rev is not arch.model
    assert type(arch.model.transformer).__name__ == "GPT2Model"
    after = arch.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert grads == {n: p.requires_grad for n, p in arch.model.named_parameters()}


@pytest.fixture(scope="module")
def bert_rev():
    """A tiny BERT classifier converted with the defaults, shared by tests that do not change it."""
    arch = make("bert", dtype=torch.float32)
    return arch, meft_fx.convert(arch.model)


def test_only_adapters_and_fresh_head_train(bert_rev):
    arch, rev = bert_rev
    trainable = [n for n, p in rev.named_parameters() if p.requires_grad]
    assert all("meft_adapter" in n or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)
    lm = make("gpt2", dtype=torch.float32)
    rev = meft_fx.convert(lm.model)
    # the LM head is the (tied) pretrained embedding: frozen
    assert all("meft_adapter" in n for n, p in rev.named_parameters() if p.requires_grad)


def test_eval_mode_is_deterministic_and_train_mode_is_not(bert_rev):
    arch, rev = bert_rev
    inputs = arch.make_inputs(2, 7)
    rev.eval()
    with torch.no_grad():
        a, b = rev(**inputs).logits, rev(**inputs).logits
    assert torch.equal(a, b)
    rev.train()
    with torch.no_grad():
        a, b = rev(**inputs).logits, rev(**inputs).logits
    assert not torch.equal(a, b)


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, ids):
        return self.mlp(self.emb(ids)).mean(1)


def test_no_transformer_block_raises_conversion_error():
    with pytest.raises(ConversionError) as e:
        meft_fx.convert(NoBlocks(), example_inputs=(torch.randint(0, 50, (2, 5)),))
    msg = str(e.value)
    assert "NoBlocks" in msg and "no transformer layer" in msg and "no residual connection" in msg


def test_untraceable_model_says_what_failed_and_what_to_try():
    with pytest.raises(meft_fx.CaptureError) as e:
        meft_fx.convert(Untraceable(), MEFTConfig(capture="export"), example_inputs=(torch.randn(2, 4),))
    msg = str(e.value)
    assert "torch.export" in msg and "What to try" in msg and "control flow" in msg


def test_non_transformers_model_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        meft_fx.convert(NoBlocks())


def test_bad_config_type():
    with pytest.raises(TypeError, match="MEFTConfig"):
        meft_fx.convert(NoBlocks(), {"method": "meft3"})


@pytest.mark.parametrize("name", ["prenorm_custom", "postnorm_custom"])
def test_fx_capture_of_hand_written_models(name):
    """torch.fx.symbolic_trace path: a causal mask built from x.size() inside each layer is recomputed in F."""
    arch = make(name, dtype=torch.float64)
    torch.manual_seed(7)
    rev = meft_fx.convert(arch.model, MEFTConfig(capture="fx"), example_inputs=arch.make_inputs(3, 5))
    captured = next(iter(meft_fx.graphs(rev).values()))
    assert "torch.fx" in captured.meta["meft_pass"]
    assert len(meft_fx.explain(rev, estimate_memory=False).couplings) == arch.num_layers
    ref = reference_twin(rev)
    inputs = arch.make_inputs(4, 9)
    _, g_rev = grads_of(rev, inputs)
    _, g_ref = grads_of(ref, inputs)
    assert_same_grads(g_rev, g_ref, 0)  # exact numerics (the default): bit-identical


# ----------------------------------------------------------------------------- reliability (issue 14)

def _ids_and_mask(inputs):
    return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}


@pytest.mark.slow  # fast set under 5 minutes
def test_a_slice_of_a_real_batch_as_example_inputs_serves_later_calls():
    arch = make("llama")
    batch = _ids_and_mask(arch.make_inputs(3, 24))
    example = {k: v[:, :16] for k, v in batch.items()}  # views, not contiguous
    assert not example["input_ids"].is_contiguous()
    rev = meft_fx.convert(arch.model, example_inputs=example)
    assert rev(**batch).logits.shape == (3, 24, 100)
    assert rev(**{k: v[1:2, ::2] for k, v in batch.items()}).logits.shape == (1, 12, 100)  # odd strides


@pytest.mark.parametrize("example_shape", [pytest.param((1, 16), marks=pytest.mark.slow),
                                           pytest.param((3, 1), marks=pytest.mark.slow), (1, 1)],
                         ids=["batch1", "seq1", "bos_only"])
def test_size_one_examples_serve_every_later_size(example_shape):
    arch = make("llama")
    rev = meft_fx.convert(arch.model, example_inputs=_ids_and_mask(arch.make_inputs(*example_shape)))
    conv = next(m for m in rev.modules() if isinstance(m, ConvertedModule))
    for shape in [(2, 7), (1, 1), (4, 3), example_shape, (1, 9)]:
        inputs = _ids_and_mask(arch.make_inputs(*shape))
        with torch.no_grad():
            assert rev(**inputs).logits.shape == (*shape, 100), shape
    assert conv.variants <= 3  # the example's fixed sizes, then one dynamic capture (and a maskless one)
    # the stacks convert's settings (λ/β, stream width) are applied to: one per captured call structure, main first
    assert conv.stacks == every_stack(rev) and len(conv.stacks) == len(conv.graph_modules) > 1
    assert conv.stacks[0] in list(conv.graph_module.modules())
    out = rev(**arch.make_inputs(2, 6))
    out.loss.backward()
    assert all(p.grad is not None for p in rev.parameters() if p.requires_grad)


def test_converting_a_converted_model_says_so(bert_rev):
    _, rev = bert_rev
    with pytest.raises(ConversionError, match="already converted by meft_fx"):
        meft_fx.convert(rev)


def test_per_layer_outputs_are_refused_by_name(bert_rev):
    arch, rev = bert_rev
    inputs = arch.make_inputs(2, 6)
    for name in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{name}=True"):
            rev(**inputs, **{name: True})
    rev.config.output_hidden_states = True
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        rev(**inputs)
    rev.config.output_hidden_states = False
    assert rev(**inputs, output_hidden_states=False).loss is not None


def test_a_head_the_caller_froze_stays_frozen_and_peft_models_are_refused():
    arch = make("bert")
    arch.model.classifier.requires_grad_(False)
    rev = meft_fx.convert(arch.model)
    assert not any(p.requires_grad for p in rev.classifier.parameters())
    assert any(p.requires_grad for n, p in rev.named_parameters() if "meft_adapter" in n)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(make("bert").model, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    with pytest.raises(ConversionError, match="PEFT modules.*get_base_model"):
        meft_fx.convert(lora)


def test_torch_save_points_to_save_adapters(bert_rev, tmp_path):
    _, rev = bert_rev
    with pytest.raises(TypeError, match="meft_fx.save_adapters"):
        torch.save(rev, tmp_path / "model.pt")
    copy.deepcopy(rev)  # deep copies still work


def test_convert_validates_a_config_changed_in_place_and_rank_against_the_hidden_size():
    cfg = MEFTConfig()
    cfg.adapter_rank = -3
    with pytest.raises(ValueError, match="MEFTConfig.adapter_rank=-3"):
        meft_fx.convert(make("bert").model, cfg)
    with pytest.raises(ValueError, match="adapter_rank=64 exceeds the hidden size 32"):
        meft_fx.convert(make("bert").model, MEFTConfig(adapter_rank=64))


def test_frac_bits_reaches_the_stacks():
    rev = meft_fx.convert(make("bert").model, MEFTConfig(frac_bits=24))
    stacks = [m for m in rev.modules() if isinstance(m, ReversibleStack)]
    assert stacks and all(s.frac_bits == 24 for s in stacks)


@pytest.mark.slow
def test_generate_of_a_model_configured_without_cache_stays_uncached():
    """A model whose generation config has use_cache=False keeps it; a plain `generate()` works
    (tests/unit/test_generation.py has the cached path)."""
    arch = make("llama")
    rev = meft_fx.convert(arch.model).eval()
    ids = arch.make_inputs(2, 5)["input_ids"]
    out = rev.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8) and torch.equal(out[:, :5], ids)
    assert rev.generation_config.use_cache is False


@pytest.mark.slow
def test_modules_to_save_trains_an_untied_lm_head_and_round_trips(tmp_path):
    """modules_to_save=["lm_head"] on a causal LM whose head is tied to the input embeddings: the head
    trains its own copy (the embeddings stay pretrained), is saved with the adapters and loads back
    bit for bit through from_pretrained; a name that matches no module is a ValueError naming it."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=96, pad_token_id=0, tie_word_embeddings=True)
    base = tf.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="'lm_haed' names no module"):
        meft_fx.convert(base, MEFTConfig(modules_to_save=["lm_haed"]))
    rev = meft_fx.convert(base, MEFTConfig(modules_to_save=["lm_head"]))
    assert rev.lm_head.weight.requires_grad and not rev.model.embed_tokens.weight.requires_grad
    embeddings = rev.model.embed_tokens.weight.clone()
    ids = torch.randint(3, 96, (2, 6))
    opt = torch.optim.SGD([p for p in rev.parameters() if p.requires_grad], lr=0.5)
    rev(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(rev.model.embed_tokens.weight, embeddings)
    assert not torch.equal(rev.lm_head.weight, embeddings)
    meft_fx.save_adapters(rev, tmp_path)
    back = meft_fx.from_pretrained(base, tmp_path).eval()
    assert back.meft_config.modules_to_save == ("lm_head",)
    assert torch.equal(back(input_ids=ids).logits, rev.eval()(input_ids=ids).logits)


@pytest.mark.slow  # fast set under 5 minutes
def test_a_second_conversion_of_the_same_architecture_skips_the_whole_model_trace(monkeypatch):
    import meft_fx.conversion as conversion

    traced = []
    real = conversion._trace_owners
    monkeypatch.setattr(conversion, "_trace_owners", lambda *a, **k: traced.append(1) or real(*a, **k))
    monkeypatch.setattr(conversion, "_OWNERS", conversion.OrderedDict())
    inputs = make("prenorm_custom").make_inputs(2, 5)
    a = meft_fx.convert(make("prenorm_custom", seed=1).model, example_inputs=inputs)
    b = meft_fx.convert(make("prenorm_custom", seed=2).model, MEFTConfig(method="meft1"), example_inputs=inputs)
    assert len(traced) == 1  # same architecture and call structure: found once
    assert meft_fx.explain(a, estimate_memory=False).unmatched == meft_fx.explain(b, estimate_memory=False).unmatched
    meft_fx.convert(make("prenorm_custom", num_layers=3).model, example_inputs=inputs)  # another architecture
    layers = make("prenorm_custom").model
    layers.layers[0].causal = False  # a flag its forward reads
    meft_fx.convert(layers, example_inputs=inputs)
    assert len(traced) == 3
