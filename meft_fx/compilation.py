"""`meft_fx.compile`: torch.compile for converted models, reversible backward included.

    rev = meft_fx.compile(meft_fx.convert(model))     # in place; returns `rev`
    rev(**batch).loss.backward()                       # compiled forward, compiled recompute

How it fits together. The reversible stack is one `torch.autograd.Function` whose backward
recomputes each coupling's F and G (replaying the dropout RNG) and calls `torch.autograd.grad`;
dynamo cannot trace that Function (generator states, Python-side state, autograd.grad in
backward), so the stack stays a graph break of the outer compiled model. What runs inside it is
compiled all the same: every coupling's F and G GraphModule is compiled on its own
(`nn.Module.compile`, dynamic shapes), and the *same* compiled F/G serve the forward (inference
graph, under no_grad) and the backward's recompute (training graph with its compiled backward).
Inductor draws dropout masks from a seed taken from the global generator at each call, so the
RNG replay of the recompute gives the recompute exactly the masks of the forward. The exact
arithmetic's steps between F and G (each update, and each restore of the backward) run compiled as
well, one kernel each with the same settings (no CUDA graphs), the same bits as eagerly
(`meft_fx.runtime.fused_steps`).

    outer graph (embeddings, masks, head, loss)   compiled by torch.compile
      └─ ReversibleStack                           graph break (dynamo.disable'd): the Python loop
           ├─ coupling 0: F, G                     compiled (inference + training graphs); the stream
           │                                       arithmetic's update / restore: one compiled kernel each
           ├─ coupling 1: F, G                     compiled
           ...

Two more graph breaks keep memory bounded in training: a causal LM whose head and loss are chunked
(`meft_fx.chunked_loss`) runs its training forward eagerly up to the stack's owner, which runs
compiled, then the chunked tail (traced, the forward would build the full logits); attention with
dropout runs its chunks eagerly (`meft_fx.nn.attention`).

`same_masks_as_eager=True` (the default) compiles with inductor's `fallback_random`: dropout uses
eager's kernels and generator, so a compiled model draws the same masks as the eager converted model
from the same seed and gives the same gradients. With False, inductor's own (fused) random numbers
are used: masks differ from eager, but the reversible backward still sees the masks its forward drew.

A call structure first seen under compile is captured eagerly (behind a graph break) and its
stack compiled like the others. transformers models meet one: traced, they pass the converted
encoder a mask tensor where eager passes None (an all-ones mask), so the first compiled step captures
once more (seconds, once).

A bare `torch.compile(converted)` works too: `ReversibleStack.forward` sees dynamo tracing it
and runs the stack behind the graph break, compiling the couplings' F and G on that first call
with the defaults of `compile_couplings` (inductor, dynamic shapes, same masks as eager) unless
they are compiled already. To choose other settings, call `compile_couplings(converted, ...)`
before `torch.compile`, or use `meft_fx.compile(converted, ...)`, which does both.
"""
from __future__ import annotations

from torch import nn

from .runtime import stacks_in

__all__ = ["compile", "compile_couplings", "compiled_couplings", "compile_like"]


def _options(backend, options, same_masks_as_eager: bool) -> dict | None:
    opts = dict(options or {})
    if same_masks_as_eager and backend == "inductor":
        opts.setdefault("fallback_random", True)
    return opts or None


def compile_couplings(model: nn.Module, *, backend="inductor", mode: str | None = None, options: dict | None = None,
                      dynamic: bool | None = True, same_masks_as_eager: bool = True) -> nn.Module:
    """Compile the F and G of every coupling of `model`'s reversible stacks, in place; returns `model`.

    Each F/G GraphModule gets `nn.Module.compile(backend=, mode=, options=, dynamic=)`
    (`ReversibleStack.compile_couplings`): its parameter names and `state_dict` keys do not change,
    and the generated programs call it compiled. The stacks run behind a dynamo graph break whenever
    an enclosing model is compiled (see the module docstring). Idempotent: a second call recompiles
    with the new settings.
    """
    stacks = stacks_in(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no ReversibleStack: call meft_fx.convert first")
    opts = _options(backend, options, same_masks_as_eager)
    for stack in stacks:
        stack.compile_couplings(backend=backend, mode=mode, options=opts, dynamic=dynamic)
    return model


def compile_like(new: nn.Module, reference: nn.Module) -> None:
    """Compile `new`'s stacks (a call structure captured later) like `reference`'s, if those are compiled."""
    settings = next((s.compile_settings for s in stacks_in(reference) if s.compile_settings is not None), None)
    if settings is not None:
        for stack in stacks_in(new):
            stack.compile_couplings(**settings)


def compiled_couplings(model: nn.Module) -> bool:
    """True when every coupling's F and G of every stack in `model` is compiled."""
    return all(s.compiled for s in stacks_in(model))


def compile(model: nn.Module, *, backend="inductor", mode: str | None = None, options: dict | None = None,
            dynamic: bool | None = True, same_masks_as_eager: bool = True, fullgraph: bool = False,
            outer: bool = True) -> nn.Module:
    """torch.compile a converted model for training, in place; returns `model`.

    Compiles the couplings' F and G (`compile_couplings`) and, with `outer=True` (default), the
    rest of the model (`nn.Module.compile`, so `state_dict` keys, `save_adapters` and attribute
    access are unchanged). `outer=False` leaves embeddings, head and loss eager: use it when
    inductor makes those slower. (A causal LM's chunked head and loss run eagerly in a compiled
    training call either way, behind a graph break, its body compiled: `meft_fx.chunked_loss`.)
    `dynamic=True` (default) traces batch and sequence as symbols: a new length reuses the graphs.
    `same_masks_as_eager`: see the module docstring. `fullgraph` must stay False: the reversible
    stack is a graph break (ValueError otherwise).
    """
    if fullgraph:
        raise ValueError("fullgraph=True cannot hold: the reversible stack runs behind a graph break "
                         "(its autograd.Function replays RNG states and calls autograd.grad in backward)")
    compile_couplings(model, backend=backend, mode=mode, options=options, dynamic=dynamic,
                      same_masks_as_eager=same_masks_as_eager)
    if outer:
        model.compile(backend=backend, mode=mode, options=_options(backend, options, same_masks_as_eager),
                      dynamic=dynamic)
    return model

