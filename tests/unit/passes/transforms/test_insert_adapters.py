import pytest
import torch

from meft_fx import passes
from architectures import make
from helpers import captured
from meft_fx import MEFTConfig
from meft_fx.nn.adapter import Adapter


@pytest.mark.parametrize("method,per_layer", [("meft3", 2), ("meft1", 1), ("meft2", 1)])
def test_adapters_per_layer_and_zero_adapters_change_nothing(method, per_layer):
    arch = make("bert", dtype=torch.float64, num_layers=2)
    model = arch.model.eval()
    inputs = arch.make_inputs(2, 7)
    inputs.pop("labels")
    gm, tensors = captured(model, inputs)
    gm.eval()
    analysis = passes.group_layers(passes.find_residual_units(gm))
    with torch.no_grad():
        before = gm(*tensors).logits
    gm = passes.insert_adapters(gm, analysis, MEFTConfig(method=method))
    gm.graph.lint()
    adapters = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Adapter)]
    assert len(adapters) == per_layer * 2
    assert all(n.meta["meft_pass"] == "insert_adapters" and n.target.startswith("meft_adapter") for n in adapters)
    gm.eval()
    with torch.no_grad():
        assert not torch.equal(gm(*tensors).logits, before)  # adapters at init are small but not zero
        for n in adapters:
            gm.get_submodule(n.target).up.weight.zero_()
        torch.testing.assert_close(gm(*tensors).logits, before, rtol=0, atol=0)


def test_parallel_adapter_reads_the_ffn_input_of_a_pre_norm_block():
    arch = make("llama", dtype=torch.float64, num_layers=2)
    inputs = arch.make_inputs(2, 7)
    inputs.pop("labels")
    gm, _ = captured(arch.model, inputs)
    analysis = passes.group_layers(passes.find_residual_units(gm))
    gm = passes.insert_adapters(gm, analysis, MEFTConfig(method="meft3"))
    ffn = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("_ffn")]
    assert len(ffn) == 2
    for n in ffn:
        src = n.args[0]
        # the normalised input (what gate/up projections read), not the raw residual stream
        users = [u for u in src.users if u.target == torch.ops.aten.linear.default]
        assert len(users) >= 2, src.format_node()
