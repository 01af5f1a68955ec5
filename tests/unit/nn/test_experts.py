"""grouped_mm: transformers' traced grouped product (`transformers::grouped_mm_fallback`) with the same bits,
computing in its backward only the gradients that are wanted."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

from meft_fx.nn.experts import grouped_mm

FALLBACK = torch.ops.transformers.grouped_mm_fallback


def _products_in_backward(out, x) -> int:
    """How many aten::mm the backward of `out` with respect to `x` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(out, x, torch.ones_like(out))
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


def _inputs(rows=(3, 0, 5, 2)):  # one expert gets no rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(rows), 6, generator=g)
    w = torch.randn(len(rows), 6, 7, generator=g)
    return x, w, torch.tensor(rows).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("want", [(True, True), (True, False), (False, True)])
def test_the_same_bits_as_transformers_op_forward_and_back(want):
    x, w, offs = _inputs()
    grad = torch.randn(x.shape[0], w.shape[2])
    x1, w1 = x.clone().requires_grad_(want[0]), w.clone().requires_grad_(want[1])
    x2, w2 = x.clone().requires_grad_(want[0]), w.clone().requires_grad_(want[1])
    out, ref = grouped_mm(x1, w1, offs), FALLBACK(x2, w2, offs)
    assert torch.equal(out, ref)
    wanted = [t for t, on in zip((x1, w1), want) if on]
    reference = [t for t, on in zip((x2, w2), want) if on]
    for a, b in zip(torch.autograd.grad(out, wanted, grad), torch.autograd.grad(ref, reference, grad)):
        assert torch.equal(a, b)


def test_frozen_experts_get_no_weight_gradient_work():
    """The fallback's backward runs two products per non-empty group (d x and d weight) even for frozen experts,
    and keeps x for it; grouped_mm runs one and keeps only the weight (and the offsets)."""
    x, w, offs = _inputs()
    x.requires_grad_()
    groups = 3
    for fn, products in ((FALLBACK, 2 * groups), (grouped_mm, groups)):
        assert _products_in_backward(fn(x, w, offs), x) == products, fn
    kept = grouped_mm(x, w, offs).grad_fn.saved_tensors
    assert kept[0] is None and kept[1] is w


def test_without_gradients_no_graph_and_a_clear_error_for_bad_shapes():
    x, w, offs = _inputs()
    assert grouped_mm(x, w, offs).grad_fn is None
    with pytest.raises(ValueError, match=r"grouped_mm: expected x \(rows, in\), weight \(experts, in, out\)"):
        grouped_mm(x, w.transpose(1, 2), offs)
