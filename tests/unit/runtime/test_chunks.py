"""Position-wise halves in chunks of tokens: same numbers, bounded working set, exact gradients kept."""
import pytest
import torch
from torch import nn

import meft_fx
from meft_fx.memory import measure_step_memory
from meft_fx.runtime import ReversibleStack
from meft_fx.runtime.chunks import ChunkPlan, run_in_chunks, vjp_in_chunks
from tests.support.architectures import make


def _mlp(d=8, width=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d)).double()


@pytest.mark.parametrize("shape", [(2, 7, 8), (1, 1, 8), (3, 5, 8)])
def test_chunks_give_the_block_s_output_and_gradients(shape):
    block, plan = _mlp(), ChunkPlan(width=32, chunk_bytes=3 * 32 * 8)  # three tokens per chunk
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(*shape, dtype=torch.float64)
    ref = block(x)
    params = list(block.parameters())
    ref_grads = torch.autograd.grad(ref, [x, *params], cot)
    torch.testing.assert_close(run_in_chunks(block, x, plan), ref, rtol=1e-14, atol=1e-14)
    out, dx, grads = vjp_in_chunks(block, True, x, cot, params, plan)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-14, atol=1e-14)
    for a, b in zip(ref_grads, [dx, *grads]):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("shape", [(2, 7, 8), (3, 5, 8)])
def test_chunks_can_write_over_their_input_and_add_into_a_gradient(shape):
    """reuse_input: the output takes the input's storage (no second tensor of its size); grad_into: d x is
    added into the given gradient in place. Same numbers as without."""
    block, plan = _mlp(), ChunkPlan(width=32, chunk_bytes=3 * 32 * 8)
    x = torch.randn(*shape, dtype=torch.float64)
    cot, acc = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    params = list(block.parameters())
    ref_out, ref_dx, ref_grads = vjp_in_chunks(block, True, x, cot, params, plan)
    mine, into = x.clone(), acc.clone()
    out, dx, grads = vjp_in_chunks(block, True, mine, cot, params, plan, reuse_input=True, grad_into=into)
    assert out.data_ptr() == mine.data_ptr() and dx is into
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(dx, acc + ref_dx, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    mine = x.clone()
    with torch.no_grad():
        out = run_in_chunks(block, mine, plan, reuse_input=True)
    assert out.data_ptr() == mine.data_ptr() and torch.equal(out, ref_out)
    # with a gradient through the input, the input is never overwritten
    leaf = x.clone().requires_grad_()
    assert run_in_chunks(block, leaf, plan, reuse_input=True).data_ptr() != leaf.data_ptr()


def test_no_input_gradient_skips_it_and_keeps_the_parameters():
    block, plan = _mlp(), ChunkPlan(width=32, chunk_bytes=3 * 32 * 8)
    x, cot = torch.randn(2, 7, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    params = list(block.parameters())
    _, _, ref = vjp_in_chunks(block, True, x, cot, params, plan)
    out, dx, grads = vjp_in_chunks(block, True, x, cot, params, plan, input_grad=False)
    assert dx is None
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _convert(arch, inputs, **cfg):
    """MEFT3 (its FFN halves run in chunks of tokens; method="auto" would pick MEFT1 for LLaMA)."""
    return meft_fx.convert(arch.model, meft_fx.MEFTConfig(method="meft3", chunk_loss=False, **cfg),
                           example_inputs=inputs)


def _grads(model, inputs):
    torch.manual_seed(1)
    out = model(**inputs)
    return torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", pytest.param("bert", marks=pytest.mark.slow)])
def test_exact_gradients_with_chunked_ffns_equal_the_reference_bit_for_bit(name):
    arch = make(name, num_layers=3)
    inputs = arch.make_inputs(4, 12)
    small = dict(recompute_chunk_bytes=5 * 64 * 4)  # 5 tokens of the 64-wide intermediate per chunk
    rev = _convert(arch, inputs, **small).train()
    stack = next(m for m in rev.modules() if isinstance(m, ReversibleStack))
    assert all(set(c.chunks) == {"G"} for c in stack.couplings[:-1])  # MEFT3: G is the FFN
    assert "run_in_chunks" in stack.program(0, "forward", torch.float32).code
    assert "chunk = g_chunks" in stack.program(0, "backward", torch.float32).code
    reversible = _grads(rev, inputs)
    stack.reversible = False  # the same network under ordinary autograd: the reference
    for a, b in zip(reversible, _grads(rev, inputs)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_a_chunk_bound_shrinks_the_backward_working_set():
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 256))
    inputs = {"input_ids": ids, "labels": ids}
    peaks = {}
    for budget in (64 * 1024, 0):  # 0: no bound (no token chunks, no FFN slices)
        rev = _convert(type("A", (), {"model": base})(), inputs, recompute_chunk_bytes=budget).train()
        stack = next(m for m in rev.modules() if isinstance(m, ReversibleStack))
        assert all(("G" in c.chunks) == bool(budget) for c in stack.couplings)
        step = lambda: rev(**inputs).loss.backward()  # noqa: E731
        step()
        rev.zero_grad(set_to_none=False)
        peaks[bool(budget)] = measure_step_memory(step).activation_bytes
    # unbounded: several (512 tokens × 2048) fp32 intermediates (4 MiB each) alive in the recompute; bounded,
    # the gated FFN runs in slices of its width (sliced_ffn), the rest of the half in token chunks
    assert peaks[True] < peaks[False] - 8 * 2 ** 20, peaks


class _Scaled(nn.Module):
    """mlp(x · w): a position-wise block reading a per-feature context w."""

    def __init__(self):
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x, w):
        return self.mlp(x * w)


@pytest.mark.parametrize("shape", [(2, 7, 8), (1, 1, 8)])
def test_chunks_take_a_per_feature_context_whole(shape):
    """Each chunk gets the context whole; its gradient is the sum of the chunks' shares."""
    block, plan = _Scaled(), ChunkPlan(width=32, chunk_bytes=3 * 32 * 8)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(*shape, dtype=torch.float64)
    ref = block(x, w)
    params = [*block.parameters(), w]
    ref_grads = torch.autograd.grad(ref, [x, *params], cot)
    torch.testing.assert_close(run_in_chunks(block, x, plan, w), ref, rtol=1e-14, atol=1e-14)
    out, dx, grads = vjp_in_chunks(block, True, x, cot, params, plan, context=(w,))
    torch.testing.assert_close(out, ref.detach(), rtol=1e-14, atol=1e-14)
    for a, b in zip(ref_grads, [dx, *grads]):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-14)


def test_min_rows_keeps_chunks_of_at_least_that_many_tokens():
    """A half with routed experts keeps MIN_EXPERT_ROWS rows per expert in every chunk, whatever the budget: where
    the floor applies, chunks of equal size between min_rows and twice that (all tokens when fewer)."""
    x = torch.empty(2, 50, 32)
    assert ChunkPlan(width=32, chunk_bytes=3 * 32 * 4).rows(x) == 3  # 34 chunks of 3 tokens (the last 1)
    assert ChunkPlan(width=32, chunk_bytes=3 * 32 * 4, min_rows=40).rows(x) == 50  # 2 chunks of 50
    assert ChunkPlan(width=32, chunk_bytes=3 * 32 * 4, min_rows=200).rows(x) == 100  # one chunk: all of them
    for tokens in (1000, 1024, 1025, 1600, 2047):  # never below the floor, also when 512 does not divide
        rows = ChunkPlan(width=32, chunk_bytes=96, min_rows=512).rows(torch.empty(tokens, 32))
        assert 512 <= rows < 1024 or rows == tokens < 1024, (tokens, rows)
    assert "min_rows=40" in repr(ChunkPlan(width=32, chunk_bytes=96, min_rows=40))
