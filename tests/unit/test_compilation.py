"""torch.compile of converted models: same gradients as eager, dynamic shapes, compiled couplings.

Slow (inductor compiles on CPU: about a minute per architecture); deselect with `-m "not slow"`.
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import meft_fx
from meft_fx.runtime import ReversibleStack
from architectures import make

pytestmark = pytest.mark.slow
# Float numerics (the paper's): at 2 layers its reconstruction error is far below the tolerance.
FLOAT = meft_fx.MEFTConfig(numerics="float")

SHAPES = [(5, 10), (6, 13)]  # (batch, seq): the second changes both
# Sizes are chosen unequal to every model size (heads 4, kv heads 2, head dim 8, hidden 32): with
# duck sizing, a first call whose seq equals, say, the head dim specializes once more (one recompile).


def _grads(model, inputs, seed=0, call=None):
    """(loss, {name: grad}) of one step of `call` (default: `model`), named by `model`'s parameters."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = (model if call is None else call)(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None}


def _assert_close(ref, got, what):
    (loss_r, gr), (loss_g, gg) = ref, got
    assert set(gr) == set(gg) and gr, what
    torch.testing.assert_close(loss_g, loss_r, rtol=1e-5, atol=1e-6)
    for name in gr:
        err = ((gg[name] - gr[name]).norm() / gr[name].norm().clamp_min(1e-12)).item()
        assert err <= 1e-4, f"{what}: {name} rel err {err:.2e}"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_replayed_masks_match_nonreversible_twin():
    """Inductor's own random numbers (masks differ from eager): the reversible backward still sees
    the masks its forward drew, so it matches the same compiled model run with reversible=False."""
    arch = make("bert", num_layers=1, hidden=32)
    inputs = arch.make_inputs(*SHAPES[0])
    rev = meft_fx.convert(arch.model, FLOAT, example_inputs=inputs)
    twin = copy.deepcopy(rev)
    for m in twin.modules():
        if isinstance(m, ReversibleStack):
            m.reversible = False
    meft_fx.compile(rev, same_masks_as_eager=False)
    meft_fx.compile(twin, same_masks_as_eager=False)
    _assert_close(_grads(twin, inputs), _grads(rev, inputs), "reversible vs reversible=False, compiled")


@pytest.mark.parametrize("numerics", ["exact"])  # the default; float runs the same path (test time)
def test_bare_torch_compile_matches_eager_and_compiles_couplings(numerics):
    """A plain `torch.compile(rev)`: the stack runs behind one graph break and its F/G get compiled on
    the first compiled call (not traced into, not left eager); a second batch size and length make no
    new graph anywhere (outer model, F and G inference/training graphs). LLaMA's couplings compiled:
    the outer=False test below (a LLaMA step under inductor takes 75 s here, BERT's 30: test time)."""
    arch = make("bert", num_layers=1, hidden=32)  # one coupling: its F and G are compiled (test time)
    eager = meft_fx.convert(arch.model, meft_fx.MEFTConfig(numerics=numerics),
                            example_inputs=arch.make_inputs(*SHAPES[0]))
    model = copy.deepcopy(eager)
    assert not meft_fx.compiled_couplings(model)
    # fallback_random: the outer graph's dropout (embeddings, classifier) draws eager's masks, as any
    # compiled model needs for eager's gradients; the couplings get it from compile_couplings' default.
    compiled = torch.compile(model, dynamic=True, options={"fallback_random": True})
    graphs = []
    for batch, seq in SHAPES:
        inputs = arch.make_inputs(batch, seq)
        _assert_close(_grads(eager, inputs), _grads(model, inputs, call=compiled), f"bare compile {numerics} seq={seq}")
        graphs.append(counters["stats"]["unique_graphs"])
    assert meft_fx.compiled_couplings(model)  # every stack's F and G, including later call structures
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs
    assert any("meft_fx reversible stack" in r for r in counters["graph_break"]), dict(counters["graph_break"])
    # nothing else, but the chunked dropping attention inside F, which runs eagerly to keep its chunks
    reasons = [r for r in counters["graph_break"] if "meft_fx reversible stack" not in r and "_apply_chunked" not in r]
    assert not reasons, reasons


@pytest.mark.slow
def test_int32_streams_compile_with_the_eager_stream_steps():
    """The fused (compiled) stream steps are int64's: a stack with 32-bit streams compiles its F and G and keeps
    the eager integer steps, with eager's gradients."""
    arch = make("bert", num_layers=1, hidden=32)
    inputs = arch.make_inputs(*SHAPES[0])
    eager = meft_fx.convert(arch.model, meft_fx.MEFTConfig(stream_bits=32), example_inputs=inputs)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, dynamic=True, options={"fallback_random": True})
    _assert_close(_grads(eager, inputs), _grads(model, inputs, call=compiled), "int32 streams, compiled")
    assert meft_fx.compiled_couplings(model)
    (st,) = [m for m in model.modules() if isinstance(m, ReversibleStack)]
    assert st.stream_bits == 32 and "torch.int32" in st.program(0, "forward", torch.float32).code


def test_compile_outer_false_compiles_only_the_couplings():
    arch = make("llama", num_layers=1, hidden=32)
    inputs = arch.make_inputs(*SHAPES[0])
    eager = meft_fx.convert(arch.model, example_inputs=inputs)
    model = meft_fx.compile(copy.deepcopy(eager), outer=False)
    assert meft_fx.compiled_couplings(model) and getattr(model, "_compiled_call_impl", None) is None
    eager.eval(), model.eval()  # a forward is enough to see the couplings compiled (gradients: tests above)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, eager(**inputs).logits, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] > 0  # the couplings' graphs (outer model eager)


def test_compiled_training_keeps_the_chunked_head_and_loss():
    """Under torch.compile a causal LM's training call still computes the loss in vocabulary blocks
    (`outputs.logits` None: the logits never exist), its body compiled; same loss and gradients as
    eager. (aot_eager: the mechanism, without inductor's compile time.)"""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=2048, max_position_embeddings=64, use_cache=False)
    ids = torch.randint(3, 2048, (2, 9))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    eager = meft_fx.convert(tf.LlamaForCausalLM(cfg), example_inputs=inputs)
    model = meft_fx.compile(copy.deepcopy(eager), backend="aot_eager")
    _assert_close(_grads(eager, inputs), _grads(model, inputs), "compiled chunked loss")
    out = model(**inputs)
    assert out.logits is None and out.loss is not None
    assert any("chunked head and loss" in r for r in counters["graph_break"])
    assert "forward" not in model.model.__dict__  # the body's compiled forward is set for a call only
