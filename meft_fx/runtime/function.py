"""The one autograd.Function that trains every reversible stack, whatever its arithmetic.

forward (no grad): encode the stream, run each coupling's generated forward program, keep the
two top streams, each coupling's residues, its `Tape` (RNG states) and the arithmetic's
fingerprint of its inputs; return the selected stream decoded.

backward: from the top coupling down, run its generated backward program — the inverse fused with
F's and G's VJPs — which rebuilds the coupling's inputs and their gradients; compare the rebuilt
inputs with the fingerprint (`ReconstructionError` if F or G gave other bits in the recompute).
What the forward kept is handed over as it is used (the top streams to the top coupling, each
coupling's residues to its program, the program's inputs in a list it empties), so at coupling i
only its own streams and gradients and the residues of couplings 0..i are alive. Hence one
backward per forward: `retain_graph=True` and a second backward is an error.

Its inputs are (stack, number of context values, x, *context, *trainable parameters): the
parameters are inputs so that backward runs even when nothing upstream requires grad.
"""
from __future__ import annotations

import torch

from ..errors import ReconstructionError
from .replay import AutocastState, Tape
from .saved import GradAccumulator, add_grads, cast_grad, output_grads, restore_context, save_context

__all__ = ["ReversibleFunction"]


class ReversibleFunction(torch.autograd.Function):
    """See the module docstring."""

    @staticmethod
    def forward(fctx, stack, n_ctx, x, *rest):
        context, params = rest[:n_ctx], rest[n_ctx:]
        arith = stack.arithmetic
        autocast = AutocastState.current(x.device.type)
        record = stack.training and stack.has_random
        with stack.errors_named(None):
            h1 = h2 = arith.encode(x)
        saved = []
        for i in range(len(stack.couplings)):
            tape = Tape(x.device, autocast, record, leaf_input=arith.leaf_input)
            check = arith.fingerprint(h1, h2)
            with stack.errors_named(i):
                h1, h2, r1, r2 = stack.program(i, "forward", x.dtype)(h1, h2, tape, *context)
            saved.append((tape, r1, r2, check))
        fctx.stack, fctx.saved, fctx.params, fctx.dtype = stack, saved, params, x.dtype
        fctx.top = [h1, h2]  # not save_for_backward: the backward frees them after the top coupling
        fctx.save_for_backward(*save_context(fctx, context))
        return stack.decoded_output(h1, h2, x.dtype)

    @staticmethod
    def backward(fctx, d_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "meft_fx: backward with create_graph=True (double backward: gradient penalties, meta-learning) is not "
                "supported by a reversible stack: its backward recomputes F and G and returns first-order gradients "
                "only, so the second-order graph would be silently wrong. Convert with MEFTConfig(reversible=False) "
                "(ordinary autograd, same network) for double backward.")
        if fctx.top is None:
            raise RuntimeError(SECOND_BACKWARD)
        stack, dtype = fctx.stack, fctx.dtype
        arith = stack.arithmetic
        (h1, h2), saved, fctx.top, fctx.saved = fctx.top, fctx.saved, None, None
        context = restore_context(fctx, fctx.saved_tensors)
        grads = GradAccumulator()
        dh1, dh2 = _owned_output_grads(stack, d_out.to(arith.grad_dtype(dtype)))
        for i in reversed(range(len(stack.couplings))):
            tape, r1, r2, check = saved.pop()
            tape.grads = grads
            tape.input_grads = i > 0 or fctx.needs_input_grad[2]  # the bottom: only if the stack's input wants one
            state = [h1, h2, r1, r2, dh1, dh2]
            h1 = h2 = r1 = r2 = dh1 = dh2 = None  # the program holds the only references (`saved.take`)
            with stack.errors_named(i, backward=True):
                h1, h2, dh1, dh2 = stack.program(i, "backward", dtype)(state, tape, *context)
            got = arith.fingerprint(h1, h2)
            if got != check:
                raise _mismatch(stack, i, got, check)
        dx = cast_grad(add_grads(dh1, dh2), dtype)  # None when the stack's input needs no gradient
        return (None, None, dx, *[grads.get(c) for c in context], *[grads.get(p) for p in fctx.params])


def _owned_output_grads(stack, d_out):
    """(dh1, dh2) of the top streams; the one the top coupling adds Gᵀdy2 into in place (its equations'
    dy1: h1, or h2 after a swap) is never `d_out` itself, which belongs to autograd (or the caller)."""
    dh1, dh2 = output_grads(stack.out_index, d_out)
    if stack.couplings[-1].swap:
        return dh1, (dh2.clone() if dh2 is d_out else dh2)
    return (dh1.clone() if dh1 is d_out else dh1), dh2


SECOND_BACKWARD = (
    "meft_fx: backward through a reversible stack a second time (retain_graph=True): its backward frees what "
    "the forward kept (the top streams, each coupling's residues) as it walks down, so there is nothing left to "
    "rebuild from. Run the forward again for every backward, or convert with MEFTConfig(reversible=False) "
    "(ordinary autograd) to keep the graph.")


def _mismatch(stack, i: int, got, want) -> ReconstructionError:
    c = stack.couplings[i]
    culprit = "G (stream 2 is rebuilt with G)" if got[1] != want[1] else "F (stream 1 is rebuilt with F)"
    return ReconstructionError(
        f"exact reversible backward: the inputs of {stack.where(i)} rebuilt from its outputs differ from the ones "
        f"the forward saw (checksum mismatch); {culprit} returned different bits in the backward's recompute than in "
        f"the forward, i.e. it is not deterministic (a non-deterministic kernel, random numbers drawn outside the "
        f"torch RNG, a kernel chosen differently with grad enabled, or parameters/modules changed between forward and "
        f"backward). Gradients would be wrong, so none are returned. Fix: make F/G deterministic "
        f"(torch.use_deterministic_algorithms(True), disable the non-deterministic kernels, do not update parameters "
        f"before backward), or convert with MEFTConfig(numerics='float') (no exactness, no check). "
        f"[{type(c.F).__name__}/{type(c.G).__name__}, λ={c.lam:g} β={c.beta:g}]")
