import pytest
import torch

from meft_fx import passes
from architectures import make
from helpers import captured
from meft_fx import MEFTConfig
from meft_fx.nn.adapter import Adapter
from meft_fx.passes.fx.provenance import module_paths
from meft_fx.runtime import ReversibleStack


def _build(method, arch_name="bert", layers=2):
    arch = make(arch_name, dtype=torch.float64, num_layers=layers)
    model = arch.model.eval()
    inputs = arch.make_inputs(2, 7)
    inputs.pop("labels", None)
    gm, tensors = captured(model, inputs)
    analysis = passes.group_layers(passes.find_residual_units(gm))
    cfg = MEFTConfig(method=method)
    gm = passes.insert_adapters(gm, analysis, cfg)
    gm = passes.build_couplings(gm, analysis, cfg)
    gm.graph.lint()
    return arch, model, inputs, gm, tensors


@pytest.mark.parametrize("method", ["meft1", "meft2", "meft3"])
def test_stack_replaces_the_layers(method):
    arch, model, inputs, gm, tensors = _build(method)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ReversibleStack)]
    assert len(calls) == 1 and calls[0].meta["meft_pass"] == "build_couplings"
    stack = gm.get_submodule(calls[0].target)
    assert len(stack.couplings) == 2
    # no op of the layers is left outside the stack
    outside = [n for n in gm.graph.nodes if any("encoder.layer" in p for p in module_paths(n))
               and n.op != "get_attr"]
    assert outside == []
    assert stack.out_index == {"meft1": 1, "meft2": 0, "meft3": 1}[method]


def test_meft3_F_and_G_are_the_pretrained_sub_blocks():
    arch, model, inputs, gm, tensors = _build("meft3")
    stack = next(m for m in gm.modules() if isinstance(m, ReversibleStack))
    for m in gm.modules():
        if isinstance(m, Adapter):
            m.up.weight.data.zero_()
    gm.eval()
    seen = {}
    stack.register_forward_pre_hook(lambda m, a: seen.setdefault("args", a))
    with torch.no_grad():
        gm(*tensors)
    x, *context = seen["args"]
    masks = [c for c in context if isinstance(c, torch.Tensor) and c.dtype == torch.bool]
    assert len(masks) == 1  # the attention mask is context; the rest are sizes
    layers = model.bert.encoder.layer
    with torch.no_grad():
        for i, c in enumerate(stack.couplings):
            assert len(c.g_context) < len(c.f_context)  # the FFN reads no mask
            attn = layers[i].attention(x, attention_mask=masks[0])
            attn = attn[0] if isinstance(attn, tuple) else attn
            torch.testing.assert_close(c.f(x, context), attn, rtol=1e-12, atol=1e-12)
            ffn = layers[i].output(layers[i].intermediate(x), x)
            torch.testing.assert_close(c.g(x, context), ffn, rtol=1e-12, atol=1e-12)
            x = ffn


def test_context_is_passed_to_the_blocks_that_read_it():
    arch, model, inputs, gm, tensors = _build("meft3", "llama")
    stack = next(m for m in gm.modules() if isinstance(m, ReversibleStack))
    # rotary cos/sin and the mask are context of attention, not of the FFN
    assert all(len(c.f_context) >= 2 for c in stack.couplings)
    assert all(len(c.g_context) == 0 for c in stack.couplings)
