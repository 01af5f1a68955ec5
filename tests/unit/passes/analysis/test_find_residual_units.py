import torch
from torch import nn

from meft_fx import passes
from architectures import make
from helpers import captured, layer_outputs, node_values


def _stream_check(arch_name, layers_of, post_norm):
    arch = make(arch_name, dtype=torch.float64, num_layers=3)
    model = arch.model.eval()
    inputs = arch.make_inputs(2, 7)
    inputs.pop("labels", None)
    gm, tensors = captured(model, inputs)
    analysis = passes.find_residual_units(gm)
    assert len(analysis.stacks) == 1
    stack = analysis.stacks[0]
    kinds = [u.kind for u in stack.units]
    assert kinds == ["attention", "ffn"] * 3
    nodes = {n.name: n for n in gm.graph.nodes}
    for u in stack.units:
        end = nodes[u.end]
        if post_norm:  # the norm after the add belongs to the unit
            assert end.target == torch.ops.aten.layer_norm.default, end.format_node()
        else:
            assert u.end == u.add
    # numbers: the stream state after each FFN unit is exactly the eager layer's output
    ffn_ends = [u.end for u in stack.units if u.kind == "ffn"]
    values = node_values(gm, tensors, ffn_ends)
    with torch.no_grad():
        eager = layer_outputs(layers_of(model), model, inputs)
    assert len(eager) == 3
    for name, ref in zip(ffn_ends, eager):
        torch.testing.assert_close(values[name], ref, rtol=1e-10, atol=1e-10)
    return stack


def test_post_norm_bert_stream_states_are_layer_outputs():
    stack = _stream_check("bert", lambda m: m.bert.encoder.layer, post_norm=True)
    assert stack.owner == "bert.encoder"
    assert stack.units[0].module == "bert.encoder.layer.0.attention"


def test_pre_norm_gpt2_stream_states_are_block_outputs():
    stack = _stream_check("gpt2", lambda m: m.transformer.h, post_norm=False)
    assert stack.owner == "transformer"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class ResidualNoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_model_without_residual_reports_why():
    gm, _ = captured(MLP(), (torch.randn(3, 8),))
    analysis = passes.find_residual_units(gm)
    assert not analysis.stacks
    assert any("no residual connection" in r for r in analysis.rejected)


def test_residual_without_attention_is_found_but_has_no_layer():
    gm, _ = captured(ResidualNoAttention(), (torch.randn(3, 5, 8),))
    analysis = passes.find_residual_units(gm)
    assert [u.kind for u in analysis.stacks[0].units] == ["ffn", "ffn"]
    grouped = passes.group_layers(analysis)
    assert not grouped.stacks
    assert any("no attention block before it" in r for r in grouped.rejected)
