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


class _Attention(nn.Module):
    """softmax(q kᵀ) v written out: a product of two activations makes the scores."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class _Routed(nn.Module):
    """A mixture-of-experts FFN: softmax over a router's linear map (position-wise), two experts."""

    def __init__(self, d=8):
        super().__init__()
        self.router = nn.Linear(d, 2, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d)) for _ in range(2))

    def forward(self, x):
        w = self.router(x).softmax(-1)
        return sum(w[..., i:i + 1] * e(x) for i, e in enumerate(self.experts))


class _Layers(nn.Module):
    def __init__(self, parallel: bool, d=8):
        super().__init__()
        self.parallel = parallel
        self.layers = nn.ModuleList(nn.ModuleDict(dict(n1=nn.LayerNorm(d), attn=_Attention(d), n2=nn.LayerNorm(d),
                                                       ffn=_Routed(d))) for _ in range(2))

    def forward(self, x):
        for m in self.layers:
            if self.parallel:  # GPT-J / GPT-NeoX: x + attn(ln1 x) + ffn(ln2 x)
                x = x + m["attn"](m["n1"](x)) + m["ffn"](m["n2"](x))
            else:
                x = x + m["attn"](m["n1"](x))
                x = x + m["ffn"](m["n2"](x))
        return x


def test_a_router_softmax_is_position_wise_and_written_out_attention_is_not():
    gm, _ = captured(_Layers(parallel=False), (torch.randn(2, 5, 8),))
    analysis = passes.group_layers(passes.find_residual_units(gm))
    assert [u.kind for u in analysis.stacks[0].units] == ["attention", "ffn"] * 2
    assert len(analysis.stacks[0].layers) == 2


def test_a_parallel_residual_layer_is_one_unit_with_its_ffn_term():
    gm, _ = captured(_Layers(parallel=True), (torch.randn(2, 5, 8),))
    analysis = passes.group_layers(passes.find_residual_units(gm))
    units = analysis.stacks[0].units
    assert [u.kind for u in units] == ["parallel"] * 2 and [len(l.units) for l in analysis.stacks[0].layers] == [1, 1]
    assert len(passes.parallel_layers(analysis)) == 2  # (named by their first node: a ModuleDict is never called)
    nodes = {n.name: n for n in gm.graph.nodes}
    ffn_term = nodes[units[0].position_wise]  # the routed FFN's output, not attention's
    assert "ffn" in ffn_term.meta["nn_module_stack"][list(ffn_term.meta["nn_module_stack"])[-1]][0]
