"""The coupling math and the reversible runtime, on hand-made F and G (no graph capture)."""
import weakref

import pytest
import torch
from torch import nn

from meft_fx.runtime import Coupling, FloatStreams, ReversibleStack

FLOAT = FloatStreams()


class Block(nn.Module):
    """A small position-wise block with dropout that also reads a context tensor."""

    def __init__(self, d, p=0.1):
        super().__init__()
        self.lin1, self.lin2, self.drop = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Dropout(p)

    def forward(self, x, ctx=None):
        h = torch.tanh(self.lin1(x))
        if ctx is not None:
            h = h * torch.sigmoid(ctx).repeat(1, 1, 2)
        return self.drop(self.lin2(h))


def make_stack(n, d, method_scales, reversible, ctx=True, seed=0, compensate=False, numerics="float"):
    torch.manual_seed(seed)
    lam, beta, swap = method_scales
    cs = [Coupling(Block(d), Block(d), lam, beta, swap, (0,) if ctx else (), (0,) if ctx else (),
                   compensate_f=compensate and lam != 1.0, compensate_g=compensate and beta != 1.0) for _ in range(n)]
    return ReversibleStack(cs, 1 if ctx else 0, out_index=1, reversible=reversible, numerics=numerics).double()


SCALES = {"meft1": (0.1, 1.0, True), "meft2": (1.0, 0.1, True), "meft3": (0.1, 0.1, False)}


def inverse(c, y1, y2, ctx):
    return c.program("inverse", FLOAT, 1)(y1, y2, None, None, ctx)


def test_generated_programs_follow_a_changed_lambda():
    """λ/β are runtime attributes; a program generated before they change must not be served after."""
    c = make_stack(1, 8, SCALES["meft3"], True).couplings[0].eval()
    assert "0.1" in c.program("inverse", FLOAT, 1).code
    c.lam = c.beta = 0.25
    code = c.program("inverse", FLOAT, 1).code
    assert "0.25" in code and "0.1" not in code
    x1, x2, ctx = (torch.randn(2, 3, 8, dtype=torch.double) for _ in range(3))
    y1, y2 = c(x1, x2, (ctx,))
    r1, r2 = inverse(c, y1, y2, ctx)
    assert torch.allclose(r1, x1, atol=1e-12) and torch.allclose(r2, x2, atol=1e-12)


@pytest.mark.parametrize("compensate", [False, True], ids=["paper", "compensated"])
@pytest.mark.parametrize("method", list(SCALES))
def test_inverse_reconstructs_inputs(method, compensate):
    c = make_stack(1, 8, SCALES[method], True, compensate=compensate).couplings[0].eval()
    x1, x2, ctx = (torch.randn(2, 3, 8, dtype=torch.double) for _ in range(3))
    y1, y2 = c(x1, x2, (ctx,))
    r1, r2 = inverse(c, y1, y2, ctx)
    assert torch.allclose(r1, x1, atol=1e-12) and torch.allclose(r2, x2, atol=1e-12)
    # the generated forward program is what calling the coupling runs
    g1, g2, n1, n2 = c.program("forward", FLOAT, 1)(x1, x2, None, ctx)
    assert torch.equal(g1, y1) and torch.equal(g2, y2) and n1 is None and n2 is None
    code = c.program("inverse", FLOAT, 1).code
    assert "self.F" in code and "self.G" in code
    assert ("/ 0.1" in code) == (SCALES[method] != (1.0, 1.0, True))


def test_program_is_regenerated_when_f_is_replaced():
    c = make_stack(1, 8, SCALES["meft3"], True).couplings[0]
    old = c.program("forward", FLOAT, 1)
    c.F = nn.Identity()
    assert c.program("forward", FLOAT, 1) is not old and c.program("forward", FLOAT, 1).F is c.F


@pytest.mark.parametrize("compensate", [False, True], ids=["paper", "compensated"])
@pytest.mark.parametrize("method", list(SCALES))
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_reversible_gradients_equal_autograd(method, x_requires_grad, compensate):
    d = 8
    rev = make_stack(4, d, SCALES[method], True, compensate=compensate)
    ref = make_stack(4, d, SCALES[method], False, compensate=compensate)
    for p in list(rev.parameters()):
        p.requires_grad_(True)
    x0 = torch.randn(3, 5, d, dtype=torch.double)
    ctx0 = torch.randn(3, 5, d, dtype=torch.double)
    grads = []
    for stack in (rev, ref):
        x = x0.clone().requires_grad_(x_requires_grad)
        ctx = ctx0.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = stack(x, ctx)
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()
        grads.append(({n: p.grad for n, p in stack.named_parameters()}, x.grad, ctx.grad))
    (pr, xr, cr), (pf, xf, cf) = grads
    assert pr.keys() == pf.keys() and len(pr) > 0
    for n in pr:
        # a parameter that cannot reach the output (the last half writing the unused stream) has no grad in both
        assert (pr[n] is None) == (pf[n] is None), n
        if pr[n] is not None:
            assert torch.allclose(pr[n], pf[n], rtol=1e-8, atol=1e-10), n
    assert sum(g is not None for g in pr.values()) >= len(pr) - 4
    assert torch.allclose(cr, cf, rtol=1e-8, atol=1e-10)
    if x_requires_grad:
        assert torch.allclose(xr, xf, rtol=1e-8, atol=1e-10)
    else:
        assert xr is None and xf is None


@pytest.mark.parametrize("method", list(SCALES))
def test_a_compensated_half_keeps_1_minus_its_scale_of_its_input(method):
    """F'(x) = F(x) − λ·x and G'(y) = G(y) − β·y for the scaled (pretrained) halves: y1 = λ·(x1 − x2) + F(x2),
    y2 = β·(x2 − y1) + G(y1); the printed programs say so."""
    lam, beta, swap = SCALES[method]
    c = make_stack(1, 8, SCALES[method], True, compensate=True).couplings[0].eval()
    x1, x2, ctx = (torch.randn(2, 3, 8, dtype=torch.double) for _ in range(3))
    y1 = lam * (x1 - x2) + c.F(x2, ctx) if lam != 1.0 else x1 + c.F(x2, ctx)
    y2 = beta * (x2 - y1) + c.G(y1, ctx) if beta != 1.0 else x2 + c.G(y1, ctx)
    got = c(x1, x2, (ctx,))
    want = (y2, y1) if swap else (y1, y2)
    assert all(torch.allclose(g, w, rtol=0, atol=1e-12) for g, w in zip(got, want))
    code = c.program("forward", FLOAT, 1).code
    assert ("leak-compensated" in code) and (("y1_leak" in code) == (lam != 1.0)) and (("y2_leak" in code) == (beta != 1.0))
    paper = make_stack(1, 8, SCALES[method], True, compensate=False).couplings[0]
    assert "leak" not in paper.program("forward", FLOAT, 1).code


@pytest.mark.parametrize("method", list(SCALES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compensated_exact_stack_gradients_are_bit_identical_to_its_reference(method, dtype):
    """Exact numerics with leak compensation: the reversible backward adds the leak's gradient (−λ·dy) in the
    order autograd does, so every gradient equals the straight-through reference bit for bit."""
    lam, beta, swap = SCALES[method]
    scales = (2.0 ** -3 if lam != 1.0 else 1.0, 2.0 ** -3 if beta != 1.0 else 1.0, swap)
    grads = []
    for reversible in (True, False):
        stack = make_stack(5, 8, scales, reversible, compensate=True, numerics="exact").to(dtype).train()
        x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
        ctx = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_(True)
        torch.manual_seed(3)
        out = stack(x, ctx)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({"x": x.grad, "ctx": ctx.grad, **{n: p.grad for n, p in stack.named_parameters()}})
    rev, ref = grads
    assert rev.keys() == ref.keys()
    # the stack's input feeds both streams, whose gradients the reference sums in another order (also without
    # compensation): close, not identical; every parameter and the context: identical
    assert torch.allclose(rev.pop("x"), ref.pop("x"), rtol=1e-5, atol=1e-7)
    for n in ref:
        assert (rev[n] is None) == (ref[n] is None), n
        assert rev[n] is None or torch.equal(rev[n], ref[n]), n


def test_backward_works_when_nothing_upstream_requires_grad():
    stack = make_stack(2, 8, SCALES["meft3"], True, ctx=False)
    x = torch.randn(2, 3, 8, dtype=torch.double)  # frozen embeddings: no grad
    stack(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


class _CountBackward(torch.autograd.Function):
    """Identity that counts how often autograd back-propagates through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class FrozenThenAdapter(nn.Module):
    """A frozen block followed by a trainable adapter on its output (MEFT3's F: attention, then an adapter)."""

    def __init__(self, d):
        super().__init__()
        self.frozen, self.adapter = nn.Linear(d, d).requires_grad_(False), nn.Linear(d, d)

    def forward(self, x, *context):
        h = self.frozen(_CountBackward.apply(x))
        return h + self.adapter(h)


@pytest.mark.parametrize("numerics", ["float", "exact"])
@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_the_bottom_f_back_propagates_only_into_parameters_when_the_input_needs_no_gradient(numerics, x_requires_grad):
    """Frozen embeddings below the stack: the bottom coupling's F runs no backward through its frozen part
    (only its adapter's parameters need a gradient), and every gradient is what autograd gives."""
    grads = {}
    for reversible in (True, False):
        torch.manual_seed(0)
        stack = ReversibleStack([Coupling(FrozenThenAdapter(8), Block(8, p=0.0), 2.0 ** -2, 2.0 ** -2, False)
                                 for _ in range(3)], 0, out_index=1, reversible=reversible, numerics=numerics).double()
        x = torch.randn(2, 5, 8, dtype=torch.double, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(x_requires_grad)
        out = stack(x)
        _CountBackward.calls = 0
        (out * out.detach().cos()).sum().backward()
        grads[reversible] = ([p.grad for p in stack.parameters() if p.requires_grad], x.grad, _CountBackward.calls)
    (rev, x_rev, calls), (ref, x_ref, ref_calls) = grads[True], grads[False]
    assert calls == (3 if x_requires_grad else 2) and ref_calls == calls
    assert all(g is not None for g in rev) and len(rev) == len(ref)
    for a, b in zip(rev, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (x_rev is None) == (not x_requires_grad)
    if x_requires_grad:
        torch.testing.assert_close(x_rev, x_ref, rtol=1e-10, atol=1e-12)


def test_global_rng_is_not_reseeded_by_backward():
    stack = make_stack(3, 8, SCALES["meft3"], True)
    x = torch.randn(2, 3, 8, dtype=torch.double, requires_grad=True)
    out = stack(x, torch.randn(2, 3, 8, dtype=torch.double))
    before = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_forward_keeps_no_autograd_graph_inside_the_stack():
    stack = make_stack(3, 8, SCALES["meft3"], True, ctx=False)
    x = torch.randn(2, 3, 8, dtype=torch.double, requires_grad=True)
    out = stack(x)
    # one node for the whole stack: the custom Function, whose inputs are x and the parameters
    assert type(out.grad_fn).__name__ == "ReversibleFunctionBackward"


@pytest.mark.parametrize("numerics,method", [("exact", "meft3"), ("exact", "meft1"), ("float", "meft3")])
def test_the_backward_frees_what_it_has_used(numerics, method):
    """At coupling i of the backward only what coupling i needs is alive: the top streams are freed once
    the top coupling is rebuilt, the residues of the couplings above i too, and a program frees the
    stream it has restored before F's recompute (the caller holds no reference to its inputs)."""
    lam, beta, swap = SCALES[method]
    stack = make_stack(3, 8, (2.0 ** -4 if lam != 1 else 1.0, 2.0 ** -4 if beta != 1 else 1.0, swap), True)
    stack.numerics = numerics
    x = torch.randn(2, 5, 8, dtype=torch.double)
    out = stack(x, torch.randn(2, 5, 8, dtype=torch.double))
    top = [weakref.ref(t) for t in out.grad_fn.top]
    residues = [[weakref.ref(r) for r in saved[1:3] if r is not None] for saved in out.grad_fn.saved]
    assert all(residues) == (numerics == "exact")
    seen, inputs = [], []

    def before_program(i):
        def hook(module, args):
            alive = lambda refs: [r() is not None for r in refs]
            seen.append((i, alive(top), [alive(rs) for rs in residues]))
            inputs[:] = [weakref.ref(t) for t in args[0][:2]]
        return hook

    def before_f(module, args):
        if inputs:  # F recomputed in the backward: one of the coupling's two input streams is freed already
            seen.append(("F", sum(r() is not None for r in inputs)))

    hooks = [stack.program(i, "backward", torch.double).register_forward_pre_hook(before_program(i)) for i in range(3)]
    hooks += [c.F.register_forward_pre_hook(before_f) for c in stack.couplings]
    loss = out.sum()
    del out  # float streams: the stack's output is its top stream 2 itself
    try:
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    programs = [s for s in seen if s[0] != "F"]
    assert [s[0] for s in programs] == [2, 1, 0]
    assert programs[0][1] == [True, True] and all(s[1] == [False, False] for s in programs[1:])
    for i, _, res in programs:  # at coupling i the residues of couplings 0..i are alive, the others freed
        assert [all(r) if r else True for r in res[:i + 1]] == [True] * (i + 1)
        assert not any(any(r) for r in res[i + 1:])
    assert [s[1] for s in seen if s[0] == "F"] == [1, 1, 1]


def test_a_second_backward_says_why_it_cannot():
    stack = make_stack(2, 8, SCALES["meft3"], True)
    loss = stack(torch.randn(2, 3, 8, dtype=torch.double), torch.randn(2, 3, 8, dtype=torch.double)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"second time \(retain_graph=True\).*MEFTConfig\(reversible=False\)"):
        loss.backward()


def test_zero_scale_is_rejected():
    with pytest.raises(ValueError, match="non-zero"):
        Coupling(nn.Identity(), nn.Identity(), 0.0, 1.0, False)
    with pytest.raises(ValueError, match="power of two"):
        ReversibleStack([Coupling(nn.Identity(), nn.Identity(), 0.1, 1.0, False)], 0, 1, numerics="exact")


def test_double_backward_is_refused_not_silently_wrong():
    stack = make_stack(2, 8, SCALES["meft3"], True)
    x = torch.randn(2, 3, 8, dtype=torch.double)
    loss = stack(x, torch.randn(2, 3, 8, dtype=torch.double)).square().sum()
    with pytest.raises(RuntimeError, match=r"create_graph=True.*MEFTConfig\(reversible=False\)"):
        torch.autograd.grad(loss, list(stack.parameters()), create_graph=True)
    ref = make_stack(2, 8, SCALES["meft3"], False)  # the suggested way: ordinary autograd supports it
    loss = ref(x, torch.randn(2, 3, 8, dtype=torch.double)).square().sum()
    grads = torch.autograd.grad(loss, list(ref.parameters()), create_graph=True, allow_unused=True)
    sum(g.square().sum() for g in grads if g is not None).backward()


def test_exact_overflow_names_the_coupling_and_a_followable_fix():
    from meft_fx.runtime import fixed_point as fxp

    big = Coupling(nn.Identity(), Block(8), 2.0 ** -4, 2.0 ** -4, False)
    big.F = _Scale(2.0 ** 40)
    stack = ReversibleStack([big], 0, 1, numerics="exact").double().eval()
    with pytest.raises(ValueError, match=r"coupling 0: quantize: .*overflow.*MEFTConfig\(frac_bits=") as e:
        stack(torch.ones(1, 2, 8, dtype=torch.double))
    assert "fewer fractional bits" not in str(e.value) and fxp.OVERFLOW_ADVICE in str(e.value)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x, *context):
        return x * self.s
