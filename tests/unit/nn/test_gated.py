"""gated_act: act(gate) * up with the same bits as the two ops, two tensors kept for the backward instead of three."""
import pytest
import torch
import torch.nn.functional as F

from meft_fx.memory import measure_step_memory
from meft_fx.nn.gated import ACTIVATIONS, gated_act

EAGER = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _inputs(dtype, shape=(3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_() for _ in range(2)] + \
        [torch.randn(*shape, generator=g).to(dtype)]


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_and_gradients_are_autograds_bits(kind, dtype):
    gate, up, grad = _inputs(dtype)
    ref = EAGER[kind](gate) * up
    ref_grads = torch.autograd.grad(ref, [gate, up], grad)
    out = gated_act(gate, up, kind)
    assert out.dtype == dtype and torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad(out, [gate, up], grad), ref_grads):
        assert torch.equal(a, b)
    # one input needing a gradient: the other's is not computed
    d_up, = torch.autograd.grad(gated_act(gate.detach(), up, kind), [up], grad)
    assert torch.equal(d_up, ref_grads[1])


def _saved_bytes(fn, *args) -> int:
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fn(*args)
    return sum(total)


def test_two_tensors_are_kept_for_the_backward_not_three():
    gate, up, _ = _inputs(torch.float32, (64, 256))
    eager = _saved_bytes(lambda a, b: F.silu(a) * b, gate, up)
    lean = _saved_bytes(gated_act, gate, up)
    assert eager == 3 * 64 * 256 * 4 and lean == 2 * 64 * 256 * 4


def test_the_backward_peak_is_one_tensor_lower():
    gate, up, grad = _inputs(torch.float32, (256, 1024))
    width = 256 * 1024 * 4
    peaks = {}
    for name, fn in (("eager", lambda a, b: F.silu(a) * b), ("lean", gated_act)):
        out = fn(gate, up)  # the most of 3 backwards: one of the full suite's (under load) peaked 0.9 MiB lower
        peaks[name] = max(measure_step_memory(lambda: torch.autograd.grad(out, [gate, up], grad, retain_graph=True))
                          .peak_bytes for _ in range(3))
        del out
    assert peaks["eager"] - peaks["lean"] >= width


def test_without_grad_it_is_the_two_ops():
    gate, up, _ = _inputs(torch.float32)
    with torch.no_grad():
        out = gated_act(gate, up)
    assert out.grad_fn is None and torch.equal(out, F.silu(gate.detach()) * up.detach())
    with pytest.raises(ValueError, match="kind='relu'.*'silu'"):
        gated_act(gate, up, "relu")
