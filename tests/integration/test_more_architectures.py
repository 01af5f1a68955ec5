"""convert() on layer shapes beyond the sequential attention-then-FFN layer (issue 15).

Parallel residual (GPT-NeoX, GPT-J, Falcon: x + attn(x) + mlp(x)): MEFT1/MEFT2 take the whole layer;
MEFT3 is refused (its G reads F's output, the parallel branches both read the layer's input) and the
default method ("auto") picks MEFT1. Routed experts (Mixtral): the router's softmax is position-wise,
so the MoE block is the FFN. Relative-position attention (DeBERTa-v2), whose model calls its encoder
with output_hidden_states=True. Shared layers (ALBERT): one coupling per call of the shared layer.
Each: one coupling per layer (call), float64 gradients bit-identical to reversible=False (exact
numerics), the default config's starting point (eval mode) within cosine 0.95 of the original.
"""
import copy

import pytest
import torch

import meft_fx
from architectures import LAYER_KINDS, MORE_ARCHITECTURES, make
from meft_fx import ConversionError, MEFTConfig
from grads import assert_same_grads, convert_pair, grads_of, loss_of, ran_reversible

LAYERS = 2  # ALBERT: two calls of its one layer
METHODS = {name: ("meft1", "meft2") if LAYER_KINDS[name] == "parallel" else ("meft1", "meft2", "meft3")
           for name in MORE_ARCHITECTURES}
DEFAULT = {name: "meft1" if LAYER_KINDS[name] == "parallel" else "meft3" for name in MORE_ARCHITECTURES}
# The recognition rules themselves are tested on hand-written modules in tests/unit/passes (fast).
FAST = ()  # every conversion here takes 5-17 s: the fast set keeps the cheap checks below (test time)


def _without_labels(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


def _check_gradients(rev, ref, arch):
    """One coupling per layer (call); float64 training gradients bit-identical to reversible=False."""
    assert len(meft_fx.explain(rev, estimate_memory=False).couplings) == LAYERS
    inputs = arch.make_inputs(4, 9)
    rev.train(), ref.train()
    out_rev, g_rev = grads_of(rev, inputs)
    _, g_ref = grads_of(ref, inputs)
    assert ran_reversible(loss_of(out_rev))
    assert_same_grads(g_rev, g_ref, 0)  # exact numerics: bit-identical
    adapters = [n for n in g_rev if "meft_adapter" in n]
    assert adapters and all(g_rev[n].abs().sum() > 0 for n in adapters)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MORE_ARCHITECTURES])
def test_default_config_keeps_the_starting_point_and_exact_gradients(name):
    arch = make(name, dtype=torch.float64, num_layers=LAYERS)
    with torch.no_grad():  # a pretrained model's stream is larger than a fresh adapter's output; a fresh
        arch.model.get_input_embeddings().weight.mul_(10)  # model's (0.02-std embeddings) is not
    original = copy.deepcopy(arch.model).eval()
    rev, ref = convert_pair(arch.model, None, arch.make_inputs(3, 5))
    assert rev.meft_config.method == DEFAULT[name]
    rev.eval()
    for batch, seq in [(1, 6), (2, 9)]:  # unpadded, then a right-padded row
        inputs = _without_labels(arch.make_inputs(batch, seq))
        with torch.no_grad():
            want = original.base_model(**inputs).last_hidden_state
            got = rev.base_model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].bool()
        cos = torch.nn.functional.cosine_similarity(got[mask], want[mask], dim=-1)
        assert cos.min() >= 0.95, (name, batch, seq, cos.min().item())
    _check_gradients(rev, ref, arch)


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [(n, m) for n in MORE_ARCHITECTURES for m in METHODS[n] if m != DEFAULT[n]])
def test_other_methods_give_exact_gradients(name, method):
    arch = make(name, dtype=torch.float64, num_layers=LAYERS)
    _check_gradients(*convert_pair(arch.model, method, arch.make_inputs(3, 5)), arch)


def test_meft3_on_parallel_layers_says_which_methods_apply():
    arch = make("gptj", num_layers=2)
    with pytest.raises(ConversionError, match=r"method='meft3'.*parallel-residual.*'meft1' or 'meft2'"):
        meft_fx.convert(arch.model, MEFTConfig(method="meft3"), example_inputs=arch.make_inputs(2, 5))


def test_a_shared_layer_is_one_stack_with_a_coupling_per_call():
    arch = make("albert", num_layers=LAYERS)
    rev = meft_fx.convert(arch.model, example_inputs=arch.make_inputs(2, 5))
    rep = meft_fx.explain(rev, estimate_memory=False)
    assert not rep.unmatched, rep.unmatched
    layer = "albert.encoder.albert_layer_groups.0.albert_layers.0"
    assert [c.layer for c in rep.couplings] == [layer] * LAYERS and {c.stack for c in rep.couplings} == {rep.couplings[0].stack}
    assert f"{layer} (call {LAYERS}/{LAYERS})" in str(rep)
    # adapters per call site: three of each kind, each trained separately
    assert len([n for n, _ in rev.named_parameters() if "meft_adapter" in n and n.endswith("_ffn.down.weight")]) == LAYERS


def _beit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  image_size=16, patch_size=4, num_labels=3, use_mask_token=False,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.BeitForImageClassification(cfg).train()  # cls_token zeros, no position embeddings


@pytest.mark.parametrize("numerics", ["float", pytest.param("exact", marks=pytest.mark.slow)])
def test_float_numerics_warns_about_exactly_zero_tokens(numerics, recwarn):
    """BEiT's fresh [CLS] token is a zero vector: the float inverse rebuilds it as noise around zero (float64
    MEFT2 gradients off by 1e2 relative, measured; 6e-15 once the token is random); exact numerics rebuild it."""
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])}
    rev = meft_fx.convert(_beit(), MEFTConfig(method="meft2", numerics=numerics), example_inputs=inputs)
    rev(**inputs).loss.backward()
    rev(**inputs)
    warned = [w for w in recwarn if "exactly zero" in str(w.message)]
    assert len(warned) == (1 if numerics == "float" else 0)


def test_eager_experts_cannot_be_traced_and_the_error_says_what_to_load():
    arch = make("mixtral", num_layers=1)
    arch.model.set_experts_implementation("eager")  # loops over the experts the batch hits
    with pytest.raises(meft_fx.CaptureError, match="experts_implementation='grouped_mm'"):
        meft_fx.convert(arch.model, example_inputs=arch.make_inputs(2, 5))
