"""Gradient helpers shared by the conversion tests: a loss for any output, per-parameter gradients, the
reversible=False twin of a converted model, and a per-parameter comparison."""
import copy
import dataclasses

import torch

import meft_fx
from meft_fx import MEFTConfig
from meft_fx.conversion import ConvertedModule
from meft_fx.runtime import ReversibleStack


def loss_of(out):
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is not None:
        return loss
    t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    weights = torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape)
    return (t * weights).sum()


def grads_of(model, inputs, seed=1234):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs)
    loss_of(out).backward()
    return out, {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


def autograd_nodes(t):
    """Names of the autograd nodes behind tensor t."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


def ran_reversible(t) -> bool:
    """Did the reversible runtime (float or exact autograd.Function) produce t?"""
    return "ReversibleFunctionBackward" in autograd_nodes(t)


def reference_twin(rev):
    """A copy of a converted model whose stacks run with ordinary autograd (what reversible=False builds)."""
    ref = copy.deepcopy(rev)
    for conv in ref.modules():
        if not isinstance(conv, ConvertedModule):
            continue
        conv.config = dataclasses.replace(conv.config, reversible=False)  # later call structures too
        for gm in conv.graph_modules:
            for m in gm.modules():
                if isinstance(m, ReversibleStack):
                    m.reversible = False
    return ref


def convert_pair(model, method, example_inputs=None, **kw):
    """(converted model, its reversible=False twin); method None: the default ("auto")."""
    torch.manual_seed(7)
    cfg = MEFTConfig(**({"method": method} if method else {}), reversible=True, **kw)
    rev = meft_fx.convert(model, cfg, example_inputs=example_inputs)
    return rev, reference_twin(rev)


def assert_same_grads(g_rev, g_ref, tol):
    assert g_rev.keys() == g_ref.keys() and g_rev
    worst, with_grad = 0.0, 0
    for name in g_ref:
        a, b = g_rev[name], g_ref[name]
        assert (a is None) == (b is None), name
        if b is None:
            continue
        with_grad += 1
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
        assert err <= tol, f"{name}: relative error {err:.3g}"
        worst = max(worst, err)
    assert with_grad == len(g_ref)  # every trainable parameter reaches the output
    return worst
