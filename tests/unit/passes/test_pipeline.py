"""The pipeline's `layer_shape` and the method="auto" it decides (meft_fx.config.auto_method)."""
import pytest
import torch
from architectures import make

import meft_fx
from meft_fx import MEFTConfig
from meft_fx.capture import capture, module_mode
from meft_fx.config import LayerShape
from meft_fx.passes import layer_shape, run_pipeline

#: arch: (pre_norm, gated_ffn, routed_experts, parallel, the method "auto" picks)
SHAPES = {
    "llama": (True, True, False, False, "meft1"),     # RMSNorm's casts after the add are not a post-norm
    "gpt2": (True, False, False, False, "meft3"),     # an ungated FFN: MEFT3's FFN half runs in token chunks
    "opt": (True, False, False, False, "meft3"),      # a view between units is not a post-norm either
    "bert": (False, False, False, False, "meft3"),    # post-norm
    "mixtral": (True, True, True, False, "meft3"),    # routed experts
    "gpt_neox": (True, False, False, True, "meft1"),  # parallel residual
}


@pytest.mark.parametrize("name", SHAPES)
def test_layer_shape_and_the_auto_method(name):
    arch = make(name)
    with module_mode(arch.model, True):
        gm, _ = capture(arch.model, (), arch.make_inputs(2, 6))
    result = run_pipeline(gm, MEFTConfig(), until="group_layers")
    shape = layer_shape(result.gm, result.analysis)
    pre_norm, gated, experts, parallel, method = SHAPES[name]
    assert (shape.pre_norm, shape.gated_ffn, shape.routed_experts, bool(shape.parallel)) == SHAPES[name][:4]
    assert all(u.post_norm == (not pre_norm) for st in result.analysis.stacks for u in st.units)
    assert result.config.method == method and result.method_reason.startswith("method='auto': ")
    assert result.method_reason == MEFTConfig().method_reason(shape)
    asked = run_pipeline(gm, MEFTConfig(method="meft2"), until="group_layers")
    assert asked.config.method == "meft2" and asked.method_reason == "asked for (MEFTConfig.method='meft2')"


def test_convert_uses_the_auto_method_and_explain_says_why():
    arch = make("llama")
    rev = meft_fx.convert(arch.model, example_inputs=arch.make_inputs(2, 6))
    assert rev.meft_config.method == "meft1" and rev.model.config.method == "meft1"
    text = str(meft_fx.explain(rev, estimate_memory=False))
    assert "method meft1" in text and "why meft1: method='auto': pre-norm layers with gated FFNs" in text
    assert all(c.beta == 1.0 and c.lam < 1.0 for st in rev.model.stacks for c in st.couplings)  # one scaled stream
    asked = meft_fx.convert(arch.model, MEFTConfig(method="meft3"), example_inputs=arch.make_inputs(2, 6))
    assert "why meft3: asked for (MEFTConfig.method='meft3')" in str(meft_fx.explain(asked, estimate_memory=False))


def test_the_shape_of_no_layers_is_the_default():
    assert LayerShape() == LayerShape((), False, False, False) and MEFTConfig().resolved().method == "meft3"
