"""The programs of one coupling, generated as torch.fx GraphModules for a stream arithmetic.

    forward   (x1, x2, tape, *context) -> (y1, y2, r1, r2)             run by the stack's forward
    inverse   (y1, y2, r1, r2, *context) -> (x1, x2)                   rebuilds the inputs (by hand)
    backward  (state, tape, *context) -> (x1, x2, dx1, dx2)              run by the stack's backward
              state = [y1, y2, r1, r2, dy1, dy2], emptied as the program takes them (`take`), so
              each is freed at its last use; the inverse with F and G called through `replay_vjp`
              (streams in stream order: a swapping coupling's programs take (y2, y1, ...))

r1, r2 are the residues the arithmetic keeps (None for float streams); outputs are in stream
order, swapped after the coupling for MEFT1/2. F and G are submodules of every program (the
coupling's own modules), so a compiled F/G serves all three. The backward is the inverse
program's equations fused with F's and G's vector-Jacobian products:

    G(y1) recomputed, Gᵀdy2 back-propagated → x2 = restore(y2, G(y1), r2, β), dy1 += Gᵀdy2
    F(x2) recomputed, Fᵀdy1 back-propagated → x1 = restore(y1, F(x2), r1, λ)
    dx1 = λ·dy1,  dx2 = β·dy2 + Fᵀdy1

(A leak-compensated half, F' = F − λ·x: its update and restore take its input stream as `source`,
and its input's gradient gains −λ·dy: dy1 += Gᵀdy2 − β·dy2, dx2 = β·dy2 + Fᵀdy1 − λ·dy1.)

(`tape.input_grads` False — the bottom coupling of a stack whose input needs no gradient — skips
Fᵀdy1 and dx1, dx2: F's recompute then back-propagates only into its trainable parameters.)

Every node is stamped `meft_pass = "codegen"`; `label_program` heads a program's printed code
with who made it (used for these programs and by `meft_fx.graphs`).
"""
from __future__ import annotations

import copy
import operator

import torch.fx as fx
from torch import nn

from . import fixed_point as fxp
from .chunks import run_in_chunks
from .replay import record_rng, replay_vjp
from .saved import add_grads_into, cast_grad, coupling_input_grads, leak_grad, take

__all__ = ["coupling_program", "equation", "inference_program", "CouplingProgram", "PROGRAMS", "label_program", "PROVENANCE_KEY"]

PROVENANCE_KEY = "meft_pass"
PROGRAMS = ("forward", "inverse", "backward")


class CouplingProgram(fx.GraphModule):
    """A generated coupling program. Its F and G are the coupling's own modules: (re)compiling the
    program's code leaves theirs alone (fx would regenerate child GraphModules, which would throw
    away what torch.compile compiled for them)."""

    def _recompile_submodules(self):
        return []


class _Emitter:
    """Builds one program: placeholders, F/G calls on decoded streams, the arithmetic's steps."""

    def __init__(self, coupling, arith, n_ctx: int, dtype):
        self.c, self.arith, self.n_ctx, self.dtype = coupling, arith, n_ctx, dtype
        self.g = fx.Graph()

    def inputs(self, *names):
        return [self.g.placeholder(n) for n in names]

    def taken(self, state, names, start: int):
        """Nodes `take(state, start + i)` named `names` (the values of a `state` list placeholder)."""
        return [self.g.create_node("call_function", take, (state, start + i), name=n) for i, n in enumerate(names)]

    def context(self):
        self.ctx = [self.g.placeholder(f"ctx_{i}") for i in range(self.n_ctx)]

    def plan(self, half: str):
        """A get_attr node of the half's ChunkPlan (the program's `F_chunks`/`G_chunks`), or None."""
        if half not in self.c.chunks:
            return None
        return self.g.create_node("get_attr", f"{half}_chunks", name=f"{half.lower()}_chunks")

    def block_args(self, half: str):
        return [self.ctx[i] for i in (self.c.f_context if half == "F" else self.c.g_context)]

    def call(self, half: str, stream):
        x = self.arith.emit_decode(self.g, stream, self.dtype, f"{half.lower()}_in")
        plan = self.plan(half)
        if plan is not None:  # position-wise: in chunks of tokens (meft_fx.runtime.chunks)
            block = self.g.create_node("get_attr", half, name=f"{half.lower()}_block")
            return self.g.create_node("call_function", run_in_chunks, (block, x, plan, *self.block_args(half)),
                                      {"reuse_input": self.arith.decodes_to_new}, name=half.lower())
        return self.g.create_node("call_module", half, (x, *self.block_args(half)), name=half.lower())

    def vjp(self, half: str, stream, cotangent, input_grad=None, grad_into=None, d_name=None):
        """(output, d_stream) nodes of `replay_vjp`, d_stream cast to the arithmetic's gradient dtype.
        `input_grad`: a node saying whether d_stream is wanted (None: always); `grad_into`: a gradient
        node d_stream is added to in place (what the returned d_stream then is)."""
        g, low = self.g, half.lower()
        x = self.arith.emit_decode(g, stream, self.dtype, f"{low}_in")
        block = g.create_node("get_attr", half, name=f"{low}_block")
        plan = self.plan(half)
        kwargs = {"chunk": plan, "reuse_input": self.arith.decodes_to_new} if plan is not None else {}
        if input_grad is not None:
            kwargs["input_grad"] = input_grad
        if grad_into is not None:
            kwargs["grad_into"] = grad_into
        res = g.create_node("call_function", replay_vjp, (self.tape, half, block, x, cotangent, *self.block_args(half)),
                            kwargs, name=f"vjp_{low}")
        out = g.create_node("call_function", operator.getitem, (res, 0), name=low)
        d_in = g.create_node("call_function", operator.getitem, (res, 1), name=d_name or f"d_{low}_in")
        gd = self.arith.grad_dtype(self.dtype) if self.dtype is not None else None
        if gd is not None and gd != self.dtype:
            d_in = g.create_node("call_function", cast_grad, (d_in, gd), name=f"d_{low}_in_{str(gd)[6:]}")
        return out, d_in

    def compensated(self, half: str) -> bool:
        return self.c.compensate_f if half == "F" else self.c.compensate_g

    def update(self, half: str, prev, src, out, new: str, residue: str):
        """`half`'s update of `prev` by `out` = half(src) (src is the leak's source when compensated)."""
        scale = self.c.lam if half == "F" else self.c.beta
        source = src if self.compensated(half) else None
        return self.arith.emit_update(self.g, prev, out, scale, (new, residue, equation(self.c, half)), source)

    def restore(self, half: str, new, src, out, residue, name: str, checked: bool = True):
        scale = self.c.lam if half == "F" else self.c.beta
        source = src if self.compensated(half) else None
        return self.arith.emit_restore(self.g, new, out, residue, scale, name, checked, source)


def _forward(e: _Emitter) -> None:
    c, g = e.c, e.g
    x1, x2, e.tape = e.inputs("x1", "x2", "tape")
    e.context()
    g.call_function(record_rng, (e.tape, "F"))
    y1, r1 = e.update("F", x1, x2, e.call("F", x2), "y1", "r1")
    g.call_function(record_rng, (e.tape, "G"))
    y2, r2 = e.update("G", x2, y1, e.call("G", y1), "y2", "r2")
    g.output(((y2, y1) if c.swap else (y1, y2)) + (r1, r2))


def _stream_inputs(e: _Emitter, a: str, b: str, state=None, start: int = 0):
    """Placeholders (or, from a `state` list, `take` nodes) of the equations' values a, b, in stream
    order: after a swapping coupling the streams (h1, h2) hold (b, a)."""
    names = (b, a) if e.c.swap else (a, b)
    nodes = e.inputs(*names) if state is None else e.taken(state, names, start)
    return (nodes[1], nodes[0]) if e.c.swap else tuple(nodes)


def _inverse(e: _Emitter) -> None:
    g = e.g
    y1, y2 = _stream_inputs(e, "y1", "y2")
    r1, r2 = e.inputs("r1", "r2")
    e.context()
    x2 = e.restore("G", y2, y1, e.call("G", y1), r2, "x2")
    x1 = e.restore("F", y1, x2, e.call("F", x2), r1, "x1")
    g.output((x1, x2))


def _backward(e: _Emitter) -> None:
    """The inverse, with F and G run through `replay_vjp` and the stream gradients alongside."""
    c, g = e.c, e.g
    state, e.tape = e.inputs("state", "tape")
    e.context()
    y1, y2 = _stream_inputs(e, "y1", "y2", state, 0)
    r1, r2 = e.taken(state, ("r1", "r2"), 2)
    dy1, dy2 = _stream_inputs(e, "dy1", "dy2", state, 4)
    if c.compensate_g:  # dy1 += (Gᵀdy2 − β·dy2), in place
        out_g, d_y1 = e.vjp("G", y1, dy2)
        d_y1 = g.create_node("call_function", leak_grad, (d_y1, dy2, c.beta), name="d_g_in_leak")
        dy1 = g.create_node("call_function", add_grads_into, (dy1, d_y1), name="dy1_total")
    else:
        out_g, dy1 = e.vjp("G", y1, dy2, grad_into=dy1, d_name="dy1_total")  # dy1 += Gᵀdy2, in place
    x2 = e.restore("G", y2, y1, out_g, r2, "x2", checked=False)  # the Function checks the fingerprint
    wanted = g.create_node("call_function", getattr, (e.tape, "input_grads"), name="input_grads")
    out_f, d_x2 = e.vjp("F", x2, dy1, wanted)
    if c.compensate_f:
        d_x2 = g.create_node("call_function", leak_grad, (d_x2, dy1, c.lam, wanted), name="d_f_in_leak")
    x1 = e.restore("F", y1, x2, out_f, r1, "x1", checked=False)
    dx = g.create_node("call_function", coupling_input_grads, (wanted, dy1, dy2, d_x2, c.lam, c.beta), name="dx")
    dx1 = g.create_node("call_function", operator.getitem, (dx, 0), name="dx1")
    dx2 = g.create_node("call_function", operator.getitem, (dx, 1), name="dx2")
    g.output((x1, x2, dx1, dx2))


def equation(coupling, half: str) -> str:
    """`half`'s update equation for any object with the coupling's attributes (generation's cached copies too)."""
    if half == "F":
        return "y1 = λ·(x1 − x2) + F(x2)" if coupling.compensate_f else "y1 = λ·x1 + F(x2)"
    return "y2 = β·(x2 − y1) + G(y1)" if coupling.compensate_g else "y2 = β·x2 + G(y1)"


_BUILDERS = {"forward": _forward, "inverse": _inverse, "backward": _backward}


def coupling_program(coupling, which: str, arith, n_ctx: int, dtype=None) -> fx.GraphModule:
    """Generate `coupling`'s program `which` ("forward", "inverse" or "backward") for `arith`.

    `n_ctx`: how many context values the stack passes; `dtype`: the dtype F and G compute in
    (what the arithmetic decodes a stream to; float streams are already in it).
    """
    if which not in _BUILDERS:
        raise ValueError(f"which={which!r}: expected one of {', '.join(map(repr, PROGRAMS))}")
    e = _Emitter(coupling, arith, n_ctx, dtype)
    _BUILDERS[which](e)
    root = nn.Module()
    root.F, root.G = coupling.F, coupling.G
    for half, plan in coupling.chunks.items():
        setattr(root, f"{half}_chunks", plan)
    for name, value in arith.attributes.items():
        setattr(root, name, value)
    for n in e.g.nodes:
        n.meta[PROVENANCE_KEY] = "codegen"
    e.g.lint()
    gm = CouplingProgram(root, e.g, class_name=f"Coupling{which.capitalize()}")
    leak = "".join(h for h, on in (("F", coupling.compensate_f), ("G", coupling.compensate_g)) if on)
    note = (f"MEFT coupling {which}, {arith.name} streams, λ={coupling.lam:g} β={coupling.beta:g}"
            + (", swap" if coupling.swap else "") + (f", leak-compensated {' and '.join(leak)}" if leak else ""))
    return label_program(gm, "codegen", f"coupling/{which}", note)


#: Fixed-point steps → (their unchecked stand-ins, how many leading arguments those take)
#: (`inference_program(..., checked=False)`).
_UNCHECKED = {fxp.quantize: (fxp.quantize_unchecked, 3), fxp.add_checked: (operator.add, 2),
              fxp.sub_shifted: (fxp.sub_shifted_unchecked, 3), fxp.dequantize: (fxp.dequantize_unchecked, 3)}


def inference_program(prog: fx.GraphModule, checked: bool = True) -> fx.GraphModule:
    """A copy of a forward program for inference (generation, torch.export): no residues, since nothing
    is rebuilt afterwards — each exact `shift_down(x, k)` is `x >> k`, the residue outputs None — and no RNG
    recording (nothing is replayed).
    `checked=False` also quantizes and adds without overflow checks (the caller checks the stack's
    output instead). The copy shares F and G with `prog`."""
    g = fx.Graph()
    g.output(g.graph_copy(prog.graph, {}))
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is record_rng:  # no tape: nothing to replay
            g.erase_node(n)
            continue
        if not checked and n.op == "call_function" and n.target in _UNCHECKED:
            target, n_args = _UNCHECKED[n.target]
            n.target, n.args = target, n.args[:n_args]
        if n.op == "call_function" and n.target is fxp.shift_down:
            for use in list(n.users):
                if use.args[1] == 0:
                    with g.inserting_before(use):
                        use.replace_all_uses_with(g.call_function(operator.rshift, tuple(n.args[:2])))
                else:
                    use.replace_all_uses_with(None)
                g.erase_node(use)
            g.erase_node(n)
    g.lint()
    return CouplingProgram(prog, g, class_name=type(prog).__name__ + "Inference")


# ----------------------------------------------------------------------------- printable provenance

_HEADED: dict = {}


def _headed_codegen(base, header: str):
    """A copy of the graph's code generator whose `def forward` is preceded by `header` comments."""
    plain = getattr(type(base), "_meft_plain", type(base))
    if plain not in _HEADED:
        def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
            d = plain.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)
            return self._meft_header + d

        _HEADED[plain] = type(f"Headed{plain.__name__}", (plain,), {"gen_fn_def": gen_fn_def, "_meft_plain": plain})
    new = copy.copy(base)
    new.__class__ = _HEADED[plain]
    new._meft_header = "".join(f"# {line}\n" for line in header.splitlines())
    return new


def label_program(gm: fx.GraphModule, made_by: str, name: str, note: str = "", marker=None) -> fx.GraphModule:
    """Head `gm`'s printed code with "# made by pass MADE_BY" and "# graph NAME[: NOTE]", in place.

    Only the generated source's comments change (not what runs). `marker`: an optional fx body
    transformer (e.g. one that tags lines with the pass that made their node). Returns `gm`.
    """
    header = f"made by pass {made_by}\ngraph {name}" + (f": {note}" if note else "")
    gm.graph._codegen = _headed_codegen(gm.graph._codegen, header)
    if marker is not None:
        gm.graph._codegen._body_transformer = marker
    gm.meta = {**(getattr(gm, "meta", None) or {}), PROVENANCE_KEY: made_by, "meft_graph": name, "meft_note": note}
    gm.recompile()
    return gm
