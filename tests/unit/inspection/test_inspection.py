"""meft_fx.explain / graphs / to_networkx / draw / debug_node, and the failure messages of convert."""
import dataclasses

import networkx as nx
import pytest
import torch
from torch import nn

import meft_fx
from untraceable import Untraceable
from meft_fx import MEFTConfig
from meft_fx.runtime import ReversibleStack
from meft_fx.inspection.debug_node import debug_node
from meft_fx.inspection.graphs import find_graph, format_program, graphs
from meft_fx.inspection.networkx_view import to_networkx
from meft_fx.passes import PIPELINE
from meft_fx.runtime import fixed_point as fxp

TRANSFORMS = [p.name for p in PIPELINE if p.kind == "transform"]

transformers = pytest.importorskip("transformers")
LAYERS = 2


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=64)
    return transformers.BertForSequenceClassification(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def rev3():
    torch.manual_seed(0)
    return meft_fx.convert(tiny_bert(), example_inputs=batch())


@pytest.fixture(scope="module")
def rev1():
    torch.manual_seed(0)
    return meft_fx.convert(tiny_bert(), MEFTConfig(method="meft1"), example_inputs=batch())


# ----------------------------------------------------------------------------- a custom model with a left-over block

class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.o(torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v)


class FFN(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.ffn = nn.LayerNorm(d), Attn(d), nn.LayerNorm(d), FFN(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class PreNormWithExtraFFN(nn.Module):
    """Two pre-norm layers, then a residual FFN with no attention before it (cannot be a layer)."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(2))
        self.extra_ln, self.extra, self.head = nn.LayerNorm(d), FFN(d), nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        h = h + self.extra(self.extra_ln(h))
        return self.head(h).mean(1)


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, ids):
        h = self.emb(ids)
        return (self.a(h) * self.b(h)).mean(1)  # h fans out but re-joins in a product, not x + f(x)


IDS = (torch.randint(0, 50, (2, 5)),)


@pytest.fixture(scope="module")
def rev_extra():
    torch.manual_seed(0)
    return meft_fx.convert(PreNormWithExtraFFN(), example_inputs=IDS)


# ----------------------------------------------------------------------------- explain

def test_explain_one_coupling_per_layer_with_memory(rev3):
    rep = meft_fx.explain(rev3)
    assert len(rep.couplings) == LAYERS
    for i, c in enumerate(rep.couplings):
        assert c.index == i and c.layer == f"bert.encoder.layer.{i}"
        assert [k for _, k in c.F] == ["attention"] and [k for _, k in c.G] == ["ffn"]
        assert c.F[0][0].startswith(c.layer) and c.G[0][0].startswith(c.layer)
        k = rev3.meft_config.scale_bits  # measured by convert
        assert (c.lam, c.beta, c.swap, c.numerics) == (2.0 ** -k, 2.0 ** -k, False, "exact")
        assert c.adapters == {"F": [f"meft_adapter_{i}_attn0"], "G": [f"meft_adapter_{i}_ffn"]}
        # autograd would cache several hidden-size tensors per token; the runtime keeps 2 int64 streams
        # per stack and, per coupling, the k + k bits per element shifted out by λ = β = 2^-k
        assert c.kept_bytes_per_token == pytest.approx(2 * 32 * 8 / LAYERS + 2 * k * 32 / 8)
        assert c.autograd_bytes_per_token > 4 * 32 * 4
        assert c.activation_bytes_saved_per_token == pytest.approx(c.autograd_bytes_per_token - c.kept_bytes_per_token)
    text = str(rep)
    assert f"{LAYERS} reversible coupling(s)" in text and "saved/token" in text and "bert.encoder.layer.1" in text
    assert "autograd would cache" in text
    assert meft_fx.explain(rev3, estimate_memory=False).couplings[0].activation_bytes_saved_per_token is None


def test_explain_float_numerics_keeps_two_streams_in_the_model_dtype():
    torch.manual_seed(0)
    rev = meft_fx.convert(tiny_bert(), meft_fx.MEFTConfig(numerics="float"), example_inputs=batch())
    for c in meft_fx.explain(rev).couplings:
        assert (c.lam, c.beta, c.swap, c.numerics) == (0.1, 0.1, False, "float")
        assert c.kept_bytes_per_token == pytest.approx(2 * 32 * 4 / LAYERS)


def test_explain_says_routed_experts_keep_a_floor_of_tokens_per_chunk():
    """A converted Mixtral's MoE half runs in chunks of at least MIN_EXPERT_ROWS rows per expert (4 experts, top-2:
    256 tokens), whatever the budget: explain says so, since its chunks exceed recompute_chunk_bytes."""
    from architectures import make

    arch = make("mixtral", num_layers=1)
    arch.model.set_experts_implementation("grouped_mm")
    rev = meft_fx.convert(arch.model, MEFTConfig(verbose=False), example_inputs=arch.make_inputs(2, 5))
    assert "routed experts: at least 256 tokens per chunk (MIN_EXPERT_ROWS rows per expert)" in str(meft_fx.explain(rev))
    assert "routed experts" not in str(meft_fx.explain(meft_fx.convert(tiny_bert(), example_inputs=batch())))


def test_explain_reference_mode_saves_nothing(rev3):
    stack = next(m for m in rev3.modules() if isinstance(m, ReversibleStack))
    stack.reversible = False  # what MEFTConfig(reversible=False) builds: ordinary autograd
    try:
        assert all(c.activation_bytes_saved_per_token == 0 for c in meft_fx.explain(rev3).couplings)
    finally:
        stack.reversible = True


def test_explain_lists_unmatched_regions_with_reason(rev_extra):
    rep = meft_fx.explain(rev_extra)
    assert len(rep.couplings) == 2
    assert len(rep.unmatched) == 1 and "no attention block before it" in rep.unmatched[0]
    assert "not rewritten:" in str(rep)


# ----------------------------------------------------------------------------- graphs

def test_graphs_has_every_stage_and_every_coupling(rev3):
    gs = graphs(rev3)
    names = list(gs)
    assert names[:len(TRANSFORMS) + 2] == ["captured", *TRANSFORMS, "final"]
    for i in range(LAYERS):
        for part in ("forward", "inverse", "backward", "F", "G"):
            assert f"coupling{i}/{part}" in gs
    assert sum(n.endswith("/inverse") for n in names) == LAYERS
    assert "shift_up" in gs["coupling0/inverse"].code  # exact (the default): the residues shifted back in
    assert "replay_vjp" in gs["coupling0/backward"].code
    for name, gm in gs.items():
        assert isinstance(gm, torch.fx.GraphModule)
        code = gm.code
        compile(code, "<g>", "exec")
        first = code.strip().splitlines()[0]
        assert first == f"# made by pass {gm.meta['meft_pass']}", (name, first)
        assert all("meft_pass" in n.meta for n in gm.graph.nodes if n.op != "output")
        assert format_program(name, gm).startswith("# made by pass")
    assert gs["captured"].meta["meft_pass"].startswith("capture")
    assert gs["coupling0/inverse"].meta["meft_pass"] == "codegen"
    # nodes a pass added are marked in the printed code, capture-time nodes are not
    adapters = [line for line in gs["insert_adapters"].code.splitlines() if "meft_adapter" in line and " = self." in line]
    assert len(adapters) == 2 * LAYERS and all(line.endswith("# <- insert_adapters") for line in adapters)
    assert "# <-" not in gs["captured"].code
    assert "self.meft_stack(" in gs["final"].code and "# <- build_couplings" in gs["final"].code
    assert find_graph(gs, "bert.encoder/coupling1/inverse")[0] == "coupling1/inverse"
    with pytest.raises(KeyError, match="did you mean"):
        find_graph(gs, "coupling1/inverze")


def _stack_inputs(model, inputs):
    """(x, context) each ReversibleStack was called with in one forward."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args))
             for m in model.modules() if isinstance(m, ReversibleStack)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("which", ["rev3", "rev1"])
def test_inverse_graphs_invert_forward_graphs(which, request):
    rev = request.getfixturevalue(which).eval()
    gs = graphs(rev)
    ((x, *context),) = _stack_inputs(rev, batch())
    torch.manual_seed(3)
    for i in range(LAYERS):
        fwd, inv = gs[f"coupling{i}/forward"], gs[f"coupling{i}/inverse"]
        x1, x2 = (fxp.quantize(t, fxp.DEFAULT_FRAC_BITS) for t in (x + 0.3 * torch.randn_like(x), x))
        with torch.no_grad():
            y1, y2, r1, r2 = fwd(x1, x2, None, *context)
            b1, b2 = inv(y1, y2, r1, r2, *context)
        assert not torch.equal(y1, x1)
        assert torch.equal(b1, x1) and torch.equal(b2, x2)  # exact numerics: bit for bit
    rev.train()


@pytest.mark.parametrize("numerics", ["exact", "float"])
def test_the_printed_programs_are_the_ones_that_run(numerics):
    """A hook on the GraphModules `graphs()` returns fires in the step: forward programs in the
    forward, backward programs (the inverse fused with F's and G's VJPs) in the backward."""
    torch.manual_seed(0)
    rev = meft_fx.convert(tiny_bert(), MEFTConfig(numerics=numerics))
    gs = graphs(rev)
    ran = []
    hooks = [gs[f"coupling{i}/{w}"].register_forward_hook(lambda m, a, o, i=i, w=w: ran.append((w, i)))
             for i in range(LAYERS) for w in ("forward", "backward")]
    try:
        out = rev(**batch(), labels=torch.tensor([0, 1]))
        assert ran == [("forward", i) for i in range(LAYERS)]
        out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert ran[LAYERS:] == [("backward", i) for i in reversed(range(LAYERS))]
    assert all(p.grad is not None for p in rev.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- networkx

def test_to_networkx_couplings_as_nodes(rev3):
    g = to_networkx(rev3)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    couplings = [n for n, d in g.nodes(data=True) if d["kind"] == "coupling"]
    assert couplings == [f"coupling{i}" for i in range(LAYERS)]
    for n in couplings:
        d = g.nodes[n]
        for key in ("index", "stack", "layer", "F", "G", "adapters", "lam", "beta", "swap", "numerics",
                    "activation_bytes_saved_per_token", "f_context", "g_context"):
            assert key in d, key
        assert d["activation_bytes_saved_per_token"] > 0
    assert nx.shortest_path(g, "input", "output") == ["input", *couplings, "output"]
    assert g.edges["coupling1", "output"]["streams"] == ("h2",)
    assert g.nodes["output"]["stream"] == "h2" and g.nodes["input"]["owner"] == "bert.encoder"
    ctx = [n for n, d in g.nodes(data=True) if d["kind"] == "context"]
    assert ctx and all(g.edges[c, "coupling0"]["kind"] == "context" for c in ctx)
    assert g.graph["method"] == "meft3" and g.graph["num_couplings"] == LAYERS


# ----------------------------------------------------------------------------- draw

def test_draw_svg_and_png(rev1, tmp_path):
    pytest.importorskip("matplotlib")
    png, svg = tmp_path / "m.png", tmp_path / "m.svg"
    assert meft_fx.draw(rev1, str(png)) == str(png)
    meft_fx.draw(rev1, str(svg), estimate_memory=False)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    text = svg.read_text()
    assert len(text) > 10_000 and "<svg" in text
    for label in ("coupling 0", "coupling 1", "F: whole layer", "G: adapter only", "G: no update", "+ adapter", "swap",
                  "MEFT1"):
        assert label in text, label
    with pytest.raises(ValueError, match="extension"):
        meft_fx.draw(rev1, str(tmp_path / "noext"))


# ----------------------------------------------------------------------------- debug_node

def _name(gm, target_name):
    return next(n.name for n in gm.graph.nodes if n.op == "call_function" and target_name in str(n.target))


def test_debug_node_explains_stream_branch_and_left_out_nodes(rev3, rev_extra):
    gm = graphs(rev3)["dropout_to_modules"]
    entry = next(n for n in gm.graph.nodes if n.op == "placeholder").name
    rep = debug_node(rev3, entry)
    assert rep.found and rep.on_stream and rep.fans_out and rep.coupling == 0
    assert "residual pattern x + f(x): yes" in str(rep) and "the input of coupling 0" in str(rep)
    gelu = _name(gm, "gelu")
    rep = debug_node(rev3, gelu)
    assert not rep.on_stream and not rep.fans_out and rep.coupling == 0
    assert "fans out: no" in str(rep) and "coupling 0's G" in str(rep) and "intermediate" in str(rep)
    missing = debug_node(rev3, gelu + "x")
    assert not missing.found and "not found" in str(missing) and gelu in str(missing)
    # a residual FFN unit that group_layers left out, and the rejection reason that names it
    relu = [n.name for n in graphs(rev_extra)["dropout_to_modules"].graph.nodes if "relu" in n.name][-1]
    text = str(debug_node(rev_extra, relu))
    assert "group_layers left this unit out" in text and "no attention block before it" in text
    # an unconverted model is captured first
    text = str(debug_node(NoBlocks(), "embedding", example_inputs=IDS))
    assert "reconverge at mul" in text and "[find_residual_units] no residual connection found" in text


# ----------------------------------------------------------------------------- failure messages

def test_no_block_error_names_node_pass_and_fix():
    with pytest.raises(meft_fx.ConversionError) as e:
        meft_fx.convert(NoBlocks(), example_inputs=IDS)
    msg = str(e.value)
    assert "NoBlocks" in msg and "[find_residual_units]" in msg and "embedding reconverges at mul (not an add)" in msg
    assert "What to do" in msg and "--debug-node" in msg


def test_untraceable_error_names_source_line_pass_and_fix():
    with pytest.raises(meft_fx.CaptureError) as e:
        meft_fx.convert(Untraceable(), example_inputs=(torch.randn(2, 4),))
    msg = str(e.value)
    assert "[capture]" in msg and "What to try" in msg and "torch.export" in msg and "torch.fx.symbolic_trace" in msg
    assert "untraceable.py:" in msg and "if x.sum() > 0" in msg  # the line the tracer failed on


def test_bad_config_error_names_field_and_choices():
    with pytest.raises(ValueError, match=r"MEFTConfig\.method='meft4'.*'meft1', 'meft2', 'meft3'"):
        MEFTConfig(method="meft4")
    with pytest.raises(ValueError, match=r"MEFTConfig\.lam=0 must be a number in \(0, 1\]"):
        MEFTConfig(lam=0)


def test_explain_accounts_what_the_backward_keeps_beside_checkpointing(rev3):
    rep = meft_fx.explain(rev3, estimate_memory=False)
    (st,) = rep.stored
    k = rev3.meft_config.scale_bits
    assert (st.layers, st.stream_bits, st.layer_bits, st.dtype_bits) == (LAYERS, 64, 2 * k, 32)
    assert st.total_bits == 128 + LAYERS * 2 * k and st.checkpointing_bits() == 32 * LAYERS
    assert st.checkpointing_bits(16) == 16 * LAYERS
    text = str(rep)
    assert "kept for the backward" in text and f"{LAYERS} layers × {2 * k} = {st.total_bits} bits" in text
    # in bf16 convert would choose int32 streams for this model (its hidden states are small): 2 × 32
    bf16 = 64 + LAYERS * 2 * k
    assert st.bf16_stream_bits == 32 and st.total_bits_in(16) == bf16
    assert f"in bf16 {bf16} against checkpointing's {16 * LAYERS}" in text
    assert dataclasses.replace(st, bf16_stream_bits=None).total_bits_in(16) == st.total_bits  # else: their width
