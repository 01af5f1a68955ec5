import pytest
import torch

from meft_fx import passes
from architectures import make
from grads import assert_same_grads, grads_of
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


def test_an_ffn_reading_a_per_feature_context_runs_in_chunks():
    """Gemma's RMSNorm scales by 1 + w, computed outside the layer: the FFN half reads it as context. Such a
    value is the same for every token, so the half still runs in chunks (here: slices of its FFN, then token
    chunks), every chunk taking it whole — with the gradients of the unchunked program."""
    import meft_fx
    from meft_fx.nn.sliced_ffn import sliced_gated_ffn
    from tests.support.architectures import _token_inputs, tiny_decoder

    inputs = _token_inputs(3, 2, 9, vocab=128)
    # MEFT3's FFN half; 4 fp64 tokens of the hidden width per chunk
    config = dict(recompute_chunk_bytes=4 * 8 * 32, chunk_loss=False, method="meft3")
    ref = meft_fx.convert(tiny_decoder("Gemma", head_dim=8), meft_fx.MEFTConfig(reversible=False, **config)).train()
    rev = meft_fx.convert(tiny_decoder("Gemma", head_dim=8), meft_fx.MEFTConfig(**config)).train()
    stack = next(m for m in rev.modules() if isinstance(m, ReversibleStack))
    for c in stack.couplings:
        assert c.g_context and "G" in c.chunks  # reads context, runs in chunks
        assert sum(n.target is sliced_gated_ffn for n in c.G.graph.nodes) == 1
    assert "run_in_chunks(g_block, g_in, g_chunks, ctx_" in stack.program(0, "forward", torch.float64).code
    out, grads = grads_of(rev, inputs)  # the same seed, so the same adapter dropout masks
    ref_out, ref_grads = grads_of(ref, inputs)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-10, atol=1e-12)
    assert_same_grads(grads, ref_grads, 1e-8)


@pytest.mark.parametrize("shape, ok", [((), True), ((32,), True), ((1, 1, 32), True), ((1, 1, 1), True),
                                       ((2, 1, 32), False), ((1, 9, 32), False), ((1, 1, 9), False), (None, False)])
def test_only_per_feature_context_lets_a_half_run_in_chunks(shape, ok):
    """A chunk of tokens takes its context whole: a size, a mask or a per-token table cannot be."""
    import types

    import torch.fx as fx

    from meft_fx.passes.transforms.build_couplings import _StackCutter

    node = fx.Graph().placeholder("ctx")
    node.meta["val"] = torch.empty(shape) if shape is not None else 9  # 9: a size (an int, as a SymInt would be)
    cutter = types.SimpleNamespace(context=[node], dim=32, _from_weights=_StackCutter._from_weights)
    assert _StackCutter.same_for_every_token(cutter, 0) is ok


@pytest.mark.parametrize("make, ok", [
    (lambda g, w, x: g.call_function(torch.ops.aten.transpose.int, (w, -2, -1)), True),  # Mixtral's experts
    (lambda g, w, x: g.call_function(torch.ops.aten.add.Tensor, (w, x)), False),  # reads an input
    (lambda g, w, x: g.call_function(torch.ops.aten.dropout.default, (w, 0.1, True)), False),  # draws
    (lambda g, w, x: g.call_function(torch.ops.aten.index.Tensor,  # a table gathered by position: wpe[arange(T)]
                                     (w, [g.call_function(torch.ops.aten.arange.default, (4,))])), False),
])
def test_a_weight_seen_through_layout_ops_is_the_same_for_every_token(make, ok):
    """Any shape, when it is a weight transposed, viewed or cast (Mixtral's experts' weights, transposed outside
    the layer); not when it reads an input, draws, or gathers rows (a position table)."""
    import types

    import torch.fx as fx

    from meft_fx.passes.transforms.build_couplings import _StackCutter

    g = fx.Graph()
    x, w = g.placeholder("x"), g.get_attr("w")
    node = make(g, w, x)
    node.meta["val"] = torch.empty(4, 32, 64)
    cutter = types.SimpleNamespace(context=[node], dim=32, _from_weights=_StackCutter._from_weights)
    assert _StackCutter.same_for_every_token(cutter, 0) is ok
