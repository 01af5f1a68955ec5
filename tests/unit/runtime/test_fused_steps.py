"""The fixed-point steps of a compiled stack (`meft_fx.runtime.fused_steps`): the eager steps' bits and errors.

Inductor compiles the kernels (a second or two each, once per shift and dtype); the stack test compiles
with dynamo's "eager" backend (the captured graphs run eager's kernels: the same bits, and no inductor time).
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import meft_fx
from meft_fx.runtime import ReversibleStack, fixed_point as fxp, fused_steps
from architectures import make

FB = fxp.DEFAULT_FRAC_BITS


@pytest.fixture
def steps():
    """Fresh dynamo caches for each test: the kernels' compiled variants (a shift, a dtype, batch 1 or more)
    add up over tests, and a function's compiled code holds at most `recompile_limit` of them."""
    torch._dynamo.reset()
    counters.clear()
    yield fused_steps.FusedSteps(dict(backend="inductor", mode=None, options=None, dynamic=True))
    torch._dynamo.reset()


def _stream(*shape, scale=3.0):
    return fxp.quantize(torch.randn(*shape) * scale, FB)


def _eager_update(prev, out, k, what="y = λ·x + F(x')"):
    q = fxp.quantize(out, FB)
    if not k:
        return fxp.add_checked(prev, q, what), None
    kept, residue = fxp.shift_down(prev, k)
    return fxp.add_checked(kept, q, what), residue


# sizes: a multiple of 8 elements and not (the residue's packed tail), batch 1 and sequence 1;
# shifts: none, MEFT's λ = β = 2^-4, and one over a byte (an int64 residue)
@pytest.mark.parametrize("k", [0, 4, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_update_and_restore_are_the_eager_steps_bit_for_bit(steps, k, dtype):
    for shape in [(2, 9, 16), (1, 1, 16), (3, 5, 7)]:
        prev, out = _stream(*shape), torch.randn(*shape).to(dtype)
        new, residue = fused_steps.update(prev, out, steps, k, FB, "y")
        want_new, want_residue = _eager_update(prev, out, k)
        assert torch.equal(new, want_new), (shape, k, dtype)
        assert (residue is None) == (want_residue is None)
        if residue is not None:
            assert residue.dtype == want_residue.dtype and torch.equal(residue, want_residue), (shape, k)
        rebuilt = fused_steps.restore(new, out, residue, steps, k, FB)
        want = fxp.shift_up_unchecked(new - fxp.quantize_unchecked(out, FB), residue, k) if k else \
            new - fxp.quantize_unchecked(out, FB)
        assert torch.equal(rebuilt, want) and torch.equal(rebuilt, prev), (shape, k, dtype)


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compensated_update_and_restore_are_the_eager_steps_bit_for_bit(steps, k, dtype):
    """A leak-compensated half: new = (prev >> k) + quantize(out) − (source >> k), restored exactly."""
    for shape in [(2, 9, 16), (1, 1, 16), (3, 5, 7)]:
        prev, source, out = _stream(*shape), _stream(*shape), torch.randn(*shape).to(dtype)
        new, residue = fused_steps.update(prev, out, steps, k, FB, "y", source=source)
        q = fxp.sub_shifted(fxp.quantize(out, FB), source, k, "y")
        kept, want_residue = fxp.shift_down(prev, k) if k else (prev, None)
        assert torch.equal(new, fxp.add_checked(kept, q, "y")), (shape, k, dtype)
        assert (residue is None) == (want_residue is None) and (residue is None or torch.equal(residue, want_residue))
        assert torch.equal(fused_steps.restore(new, out, residue, steps, k, FB, source=source), prev), (shape, k)


def test_new_sizes_reuse_the_kernels(steps):
    """Dynamic shapes: a new batch and length run the same compiled kernels (no new graph)."""
    graphs = []
    for shape in [(4, 11, 32), (2, 6, 32), (5, 3, 32)]:
        prev, out = _stream(*shape), torch.randn(*shape)
        new, residue = fused_steps.update(prev, out, steps, 3, FB, "y")
        assert torch.equal(fused_steps.restore(new, out, residue, steps, 3, FB), prev)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 2, 2], graphs  # update's and restore's, made once


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0 ** (63 - FB)])
def test_an_update_out_of_range_raises_the_eager_error(steps, bad):
    prev, out = _stream(2, 5, 16), torch.randn(2, 5, 16)
    out[1, 2, 3] = bad
    with pytest.raises(ValueError) as eager:
        _eager_update(prev, out, 4)
    with pytest.raises(ValueError) as fused:
        fused_steps.update(prev, out, steps, 4, FB, "y")
    assert str(fused.value) == str(eager.value)


def test_an_overflowing_sum_names_the_equation(steps):
    prev = torch.full((2, 8), (1 << 62) + (1 << 61), dtype=torch.int64)
    out = torch.full((2, 8), 2.0 ** (62 - FB))
    with pytest.raises(fxp.FixedPointOverflow, match="y1 = λ·x1 \\+ F\\(x2\\) overflows int64"):
        fused_steps.update(prev, out, steps, 0, FB, "y1 = λ·x1 + F(x2)")


def test_at_the_edge_of_the_range_the_flag_defers_to_the_eager_steps(steps):
    """−2^(63−frac_bits) is representable (the eager check allows it); the kernel's test flags it, and the
    eager steps then give the result instead of an error."""
    prev, out = _stream(2, 8), torch.zeros(2, 8)
    out[0, 0] = -(2.0 ** (63 - FB))
    prev[0, 0] = 0
    new, residue = fused_steps.update(prev, out, steps, 4, FB, "y")
    want_new, want_residue = _eager_update(prev, out, 4)
    assert torch.equal(new, want_new) and torch.equal(residue, want_residue)


def test_kernels_are_compiled_without_cuda_graphs():
    """An update's output is the stream every later coupling reads; a CUDA graph would overwrite it on its next
    run. So the couplings' mode, cudagraph option and cudagraphs backend do not reach the kernels (the rest does)."""
    steps = fused_steps.FusedSteps(dict(backend="inductor", mode="reduce-overhead", dynamic=True,
                                        options={"triton.cudagraphs": True, "fallback_random": True}))
    assert steps.compile_kwargs() == dict(backend="inductor", options={"fallback_random": True}, dynamic=True)
    assert fused_steps.FusedSteps(dict(backend="eager", mode="max-autotune", options=None, dynamic=False)
                                  ).compile_kwargs() == dict(backend="eager", options=None, dynamic=False)
    assert fused_steps.FusedSteps(dict(backend="cudagraphs", mode=None, options=None, dynamic=True)
                                  ).compile_kwargs()["backend"] == "eager"


def test_a_copy_looks_its_kernels_up_again(steps):
    """deepcopy (of a compiled model) copies the settings, not the compiled modules: it finds them again in the
    shared cache on first use."""
    fused_steps.update(_stream(2, 8), torch.randn(2, 8), steps, 4, FB, "y")
    assert steps.kernels
    twin = copy.deepcopy(steps)
    assert twin.settings == steps.settings and not twin.kernels


@pytest.mark.slow  # 15 s (inductor): the fast set stays under 5 minutes
def test_a_compiled_stack_runs_the_fused_steps_with_the_same_gradients():
    """A stack whose couplings are compiled (backend "eager": F and G run eager's kernels) generates
    programs calling the fused steps, and trains to the same loss and gradients, bit for bit, as the same
    model uncompiled; an uncompiled stack keeps the eager steps."""
    arch = make("llama", num_layers=1, hidden=32)
    inputs = arch.make_inputs(3, 9)
    eager = meft_fx.convert(arch.model, example_inputs=inputs)
    compiled = meft_fx.compile_couplings(copy.deepcopy(eager), backend="eager")
    stack = next(m for m in compiled.modules() if isinstance(m, ReversibleStack))
    plain = next(m for m in eager.modules() if isinstance(m, ReversibleStack))
    assert "fused_steps_update" not in plain.program(0, "forward", torch.float32).code
    assert "fused_steps_update" in stack.program(0, "forward", torch.float32).code
    assert "fused_steps_restore" in stack.program(0, "backward", torch.float32).code
    for batch, seq in [(3, 9), (1, 4)]:  # (seq 1 has no next token to predict: a NaN loss)
        x = arch.make_inputs(batch, seq)
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            loss = model(**x).loss
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (loss_e, ge), (loss_c, gc) = grads
        assert torch.equal(loss_e, loss_c) and ge.keys() == gc.keys() and ge
        for n in ge:
            assert torch.equal(ge[n], gc[n]), n


def test_each_shift_has_its_own_compiled_code(steps):
    """Dynamo keeps at most `recompile_limit` (8) compiled variants per function: with one function for every
    kernel, 9 shifts × 2 grad modes would run out and the later kernels would run eagerly. Each (step, shift)
    has its own code, and runs under no_grad (one grad mode): a graph per shift."""
    shifts = range(torch._dynamo.config.recompile_limit + 1)
    for k in shifts:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                fused_steps.update(_stream(2, 8), torch.randn(2, 8), steps, k, FB, "y")
    assert counters["stats"]["unique_graphs"] == len(shifts), dict(counters["stats"])


def test_an_update_that_is_not_the_streams_shape_or_dtype_is_the_eager_error(steps):
    prev = _stream(2, 9, 16)
    for out, match in [(torch.randn(2, 16, 9), "the update has shape"), (torch.randn(1), "the update has shape"),
                       (torch.ones(2, 9, 16, dtype=torch.int64), "floating")]:
        with pytest.raises(ValueError, match=match):
            fused_steps.update(prev, out, steps, 4, FB, "y")


def test_a_new_compile_with_the_same_settings_reuses_the_programs():
    """Programs are cached per arithmetic key: compiling again with the same settings, or switching numerics
    there and back, makes no new programs (nor keeps old ones alive)."""
    arch = make("llama", num_layers=1, hidden=32)
    rev = meft_fx.convert(arch.model, example_inputs=arch.make_inputs(2, 5))
    stack = next(m for m in rev.modules() if isinstance(m, ReversibleStack))
    stack.compile_couplings(backend="eager")
    first = stack.program(0, "forward", torch.float32)
    stack.compile_couplings(backend="eager")
    stack.numerics = "float"
    stack.numerics = "exact"
    assert stack.program(0, "forward", torch.float32) is first
    stack.compile_couplings(backend="eager", options={"some_option": True})  # other settings: other programs
    assert stack.program(0, "forward", torch.float32) is not first
