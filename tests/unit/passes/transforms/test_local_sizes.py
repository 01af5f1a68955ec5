"""local_sizes: an FFN half that reshapes to the batch and sequence sizes (or counts its tokens) reads them off
its own input, so it runs in chunks of tokens (GPT-2, OPT, Mixtral), with the gradients of the whole half, call
after call."""
import copy

import pytest
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from meft_fx import MEFTConfig, passes
from meft_fx.runtime import ReversibleStack
from architectures import make
from grads import assert_same_grads, convert_pair, grads_of
from helpers import captured


def _stack(name, batch, seq):
    arch = make(name, dtype=torch.float64, num_layers=2)
    inputs = arch.make_inputs(batch, seq)
    inputs.pop("labels", None)
    gm, _ = captured(arch.model.eval(), inputs)
    analysis = passes.group_layers(passes.find_residual_units(gm))
    cfg = MEFTConfig(method="meft3")
    gm = passes.build_couplings(passes.insert_adapters(gm, analysis, cfg), analysis, cfg)
    return next(m for m in gm.modules() if isinstance(m, ReversibleStack))


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_the_ffn_half_reads_its_sizes_off_its_input_and_runs_in_chunks(name):
    stack = _stack(name, 2, 7)
    for c in stack.couplings:
        assert c.g_context == () and "G" in c.chunks
        sizes = [n for n in c.G.graph.nodes if n.meta.get("meft_pass") == "local_sizes"]
        assert sizes and all(n.target is torch.ops.aten.sym_size.int and n.args[0].op == "placeholder" for n in sizes)
        assert len([n for n in c.G.graph.nodes if n.op == "placeholder"]) == 1  # the stream alone


def _half(shape_syms, sizes):
    """A half (stream, *sizes, w) -> (stream · w).view(*sizes, -1), with symbolic metas as a capture leaves them."""
    g = fx.Graph()
    x, *ctx = [g.placeholder(n) for n in ["stream", *[f"ctx_{i}" for i in range(len(sizes))], "w"]]
    g.output(g.call_function(torch.ops.aten.view.default,
                             (g.call_function(torch.ops.aten.mul.Tensor, (x, ctx[-1])), [*ctx[:-1], -1])))
    env = ShapeEnv()
    syms = {name: env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint)
            for name, hint in (("b", 3), ("s", 5))}
    with FakeTensorMode(shape_env=env):
        x.meta["val"] = torch.empty(*[syms[n] for n in shape_syms], 4)
        ctx[-1].meta["val"] = torch.empty(4)
    for node, name in zip(ctx, sizes):
        node.meta["val"] = syms[name]
    return fx.GraphModule(torch.nn.Module(), g)


def test_a_size_is_read_off_the_input_only_when_exactly_one_dimension_has_it():
    half = _half(("b", "s"), ("b", "s"))
    assert passes.local_sizes(half) == [0, 1]  # both sizes; the tensor context stays
    assert [n.name for n in half.graph.nodes if n.op == "placeholder"] == ["stream", "w"]
    x, w = torch.randn(1, 3, 4), torch.randn(4)  # a chunk: the view takes its own sizes
    torch.testing.assert_close(half(x, w), x * w)
    shared = _half(("b", "b"), ("b",))  # one symbol for both dimensions: which one the view meant is unknown
    code = shared.code
    assert passes.local_sizes(shared) == [] and shared.code == code


@pytest.mark.parametrize("name", ["gpt2", "opt", pytest.param("mixtral", marks=pytest.mark.slow)])  # Mixtral in float64: its batched experts
def test_chunked_halves_give_the_whole_halves_gradients_call_after_call(name):
    arch = make(name, dtype=torch.float64)
    whole_model = copy.deepcopy(arch.model)
    chunked, _ = convert_pair(arch.model, "meft3", recompute_chunk_bytes=4 * 8 * 64, chunk_loss=False)
    whole, _ = convert_pair(whole_model, "meft3", recompute_chunk_bytes=0, chunk_loss=False)
    assert all("G" in c.chunks for m in chunked.modules() if isinstance(m, ReversibleStack) for c in m.couplings)
    chunked.eval(), whole.eval()  # no dropout: chunks draw their masks chunk by chunk
    for batch, seq in ((3, 9), (1, 2), (2, 13)):  # padded, batch 1 (sequence 2: one next-token target), another length
        inputs = arch.make_inputs(batch, seq)
        out, grads = grads_of(chunked, inputs)
        ref_out, ref_grads = grads_of(whole, inputs)
        torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-12, atol=1e-14)
        assert_same_grads(grads, ref_grads, 1e-12)


def test_a_product_of_the_input_sizes_and_an_arange_over_it_are_rebuilt_from_the_input():
    """Mixtral's experts view their rows as (batch · sequence, top-k, width) and invert their routing with
    arange(top-k · batch · sequence): both are rebuilt from the half's own input, so a chunk counts its own."""
    g = fx.Graph()
    x, n, idx = g.placeholder("stream"), g.placeholder("ctx_0"), g.placeholder("ctx_1")
    rows = g.call_function(torch.ops.aten.view.default, (x, [n, -1]))
    g.output(g.call_function(torch.ops.aten.add.Tensor, (rows, g.call_function(torch.ops.aten.sum.default, (idx,)))))
    env = ShapeEnv()
    b, s = (env.create_symintnode(env.create_symbol(h, ConstantSource(k)), hint=h) for k, h in (("b", 3), ("s", 5)))
    whole = fx.Graph()  # the graph the half was cut from: where its context was made
    made = whole.call_function(torch.ops.aten.arange.default, (whole.placeholder("size"),), {"dtype": torch.float32})
    whole.nodes.__iter__().__next__().meta["val"] = 2 * b * s
    with FakeTensorMode(shape_env=env):
        x.meta["val"] = torch.empty(b, s, 4)
        idx.meta["val"] = made.meta["val"] = torch.empty(2 * b * s)
    n.meta["val"] = b * s
    half = fx.GraphModule(torch.nn.Module(), g)
    assert passes.local_sizes(half, [None, made]) == [0, 1]
    assert [p.name for p in half.graph.find_nodes(op="placeholder")] == ["stream"]
    chunk = torch.randn(1, 7, 4)  # a chunk of 7 tokens: 7 rows, arange(14)
    torch.testing.assert_close(half(chunk), chunk.view(7, -1) + torch.arange(14.0).sum())


def test_a_size_factory_that_draws_or_reads_a_tensor_stays_context():
    g = fx.Graph()
    x, t = g.placeholder("stream"), g.placeholder("ctx_0")
    g.output(g.call_function(torch.ops.aten.add.Tensor, (x, t)))
    whole = fx.Graph()
    drawn = whole.call_function(torch.ops.aten.rand.default, ([4],))
    env = ShapeEnv()
    b = env.create_symintnode(env.create_symbol(3, ConstantSource("b")), hint=3)
    with FakeTensorMode(shape_env=env):
        x.meta["val"] = torch.empty(b, 4)
        t.meta["val"] = drawn.meta["val"] = torch.empty(4)
    half = fx.GraphModule(torch.nn.Module(), g)
    code = half.code
    assert passes.local_sizes(half, [drawn]) == [] and half.code == code


def test_mixtral_experts_half_runs_in_chunks_with_the_whole_halves_gradients(monkeypatch):
    """float32 Mixtral (transformers' grouped experts): the FFN half reads only its experts' weights (transposed
    outside the layer, the same for every token), rebuilds its token count and arange, runs in chunks sized by
    its widest activation per token (top-k 2 × 2 × intermediate 64 = 256), at least MIN_EXPERT_ROWS rows per
    expert (4 experts, top-2: 2 · MIN_EXPERT_ROWS tokens), and gives the unchunked gradients."""
    from meft_fx.nn.experts import grouped_mm
    from meft_fx.passes.transforms import build_couplings

    monkeypatch.setattr(build_couplings, "MIN_EXPERT_ROWS", 2)  # chunks of 4 tokens at the least: these batches chunk
    arch = make("mixtral", dtype=torch.float32)
    arch.model.set_experts_implementation("grouped_mm")
    whole_model = copy.deepcopy(arch.model)
    chunked, _ = convert_pair(arch.model, None, recompute_chunk_bytes=4 * 4 * 256, chunk_loss=False)
    whole, _ = convert_pair(whole_model, None, recompute_chunk_bytes=0, chunk_loss=False)
    for c in next(m for m in chunked.modules() if isinstance(m, ReversibleStack)).couplings:
        assert c.chunks["G"].width == 256 and c.chunks["G"].min_rows == 4
        assert c.chunks["G"].rows(torch.empty(3, 9, 32)) < 27  # the first batch below runs in chunks
        context = [n.meta["val"] for n in c.G.graph.find_nodes(op="placeholder")][1:]
        assert [tuple(v.shape) for v in context] == [(4, 32, 128), (4, 64, 32)]  # the experts' weights
        assert any(n.target is torch.ops.aten.arange.default for n in c.G.graph.nodes)
        assert sum(n.target is grouped_mm for n in c.G.graph.nodes) == 2  # grouped_experts
    chunked.eval(), whole.eval()
    for batch, seq in ((3, 9), (1, 2), (2, 13)):
        inputs = arch.make_inputs(batch, seq)
        out, grads = grads_of(chunked, inputs)
        ref_out, ref_grads = grads_of(whole, inputs)
        torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-6, atol=1e-7)
        assert_same_grads(grads, ref_grads, 1e-5)


def _sized_half(stream_shape, size_of):
    """A half (stream, ctx_0) -> stream + ctx_0.sum(), ctx_0 = arange(size) made in the whole graph; `size_of`
    maps the symbols (b, s) to the size. Returns (half, the arange's node in the whole graph)."""
    g = fx.Graph()
    x, t = g.placeholder("stream"), g.placeholder("ctx_0")
    g.output(g.call_function(torch.ops.aten.add.Tensor, (x, g.call_function(torch.ops.aten.sum.default, (t,)))))
    env = ShapeEnv()
    syms = {k: env.create_symintnode(env.create_symbol(h, ConstantSource(k)), hint=h) for k, h in (("b", 3), ("s", 5))}
    whole = fx.Graph()
    size = whole.placeholder("size")
    size.meta["val"] = size_of(syms)
    made = whole.call_function(torch.ops.aten.arange.default, (size,))
    with FakeTensorMode(shape_env=env):
        x.meta["val"] = torch.empty(*[syms.get(d, d) for d in stream_shape], 4)
        t.meta["val"] = made.meta["val"] = torch.empty(size_of(syms))
    return fx.GraphModule(torch.nn.Module(), g), made


@pytest.mark.parametrize("stream_shape, size_of, why", [
    (("b", "s"), lambda y: y["s"], "arange(sequence) is a position: it would restart in every chunk"),
    ((2, "s"), lambda y: 2 * y["s"], "a fixed batch of 2: the coefficient may stand for it"),
])
def test_what_a_chunk_would_get_wrong_stays_context(stream_shape, size_of, why):
    half, made = _sized_half(stream_shape, size_of)
    code = half.code
    assert passes.local_sizes(half, [made]) == [] and half.code == code, why
