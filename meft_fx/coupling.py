"""Two-stream reversible couplings (MEFT) and the autograd.Function that trains them.

The whole method, per coupling n (λ scales stream 1, β stream 2):

    forward:  y1 = λ·x1 + F(x2)              inverse:  x2 = (y2 − G(y1)) / β
              y2 = β·x2 + G(y1)                        x1 = (y1 − F(x2)) / λ
              (MEFT1/2 then swap the streams)

Backward, from the top coupling down, fused so that F and G each run once more:
    recompute G(y1) with grad → dy1 += Gᵀdy2 → x2 = (y2 − G(y1))/β
    recompute F(x2) with grad → dx2 = β·dy2 + Fᵀdy1 → x1 = (y1 − F(x2))/λ,  dx1 = λ·dy1
Forward runs under no_grad and keeps only the two top streams (+ RNG states for dropout replay).

This module is the float arithmetic (`numerics="float"`, the paper's). A stack built with
`numerics="exact"` holds both streams in int64 fixed point and is run by `meft_fx.exact`, which
reuses the RNG/autocast replay, context handling and `_half_backward` defined here.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from . import fixed_point as fxp
from .config import NUMERICS, exponent_of


# ----------------------------------------------------------------------------- the arithmetic

def step(scale: float, prev, update):
    """One stream update: scale·prev + update (scale 1 is skipped, so it is exact)."""
    return prev + update if scale == 1.0 else prev * scale + update


def unstep(scale: float, out, update):
    """Invert `step`: prev = (out − update) / scale."""
    return out - update if scale == 1.0 else (out - update) / scale


class Coupling(nn.Module):
    """y1 = λ·x1 + F(x2); y2 = β·x2 + G(y1); optionally swap. F and G take (stream, *their context).

    `forward`/`inverse` (and the "forward"/"inverse" graphs) are the float equations.
    `exact_forward`/`exact_inverse` (and the "exact_forward"/"exact_inverse" graphs) are the same
    coupling on int64 fixed-point streams (`meft_fx.fixed_point`, λ = 2^-k1, β = 2^-k2): the
    inverse is bit-exact. Which one a `ReversibleStack` runs is its `numerics`.
    """

    def __init__(self, F: nn.Module, G: nn.Module, lam: float, beta: float, swap: bool,
                 f_context: Sequence[int] = (), g_context: Sequence[int] = (), info: dict | None = None):
        super().__init__()
        if lam == 0 or beta == 0:
            raise ValueError("a coupling needs non-zero λ and β to be invertible")
        self.F, self.G = F, G
        self.lam, self.beta, self.swap = float(lam), float(beta), bool(swap)
        self.f_context, self.g_context = tuple(f_context), tuple(g_context)
        self.info = dict(info or {})
        self.__dict__["_graphs"] = {}

    def f(self, x2, context):
        return self.F(x2, *[context[i] for i in self.f_context])

    def g(self, y1, context):
        return self.G(y1, *[context[i] for i in self.g_context])

    @property
    def exponents(self) -> tuple[int, int]:
        """(k1, k2) with λ = 2^-k1, β = 2^-k2; ValueError if λ or β is not a power of two."""
        return exponent_of(self.lam, "λ"), exponent_of(self.beta, "β")

    def forward(self, x1, x2, context=()):
        y1 = step(self.lam, x1, self.f(x2, context))
        y2 = step(self.beta, x2, self.g(y1, context))
        return (y2, y1) if self.swap else (y1, y2)

    def inverse(self, y1, y2, context=()):
        """Reconstruct (x1, x2) from this coupling's outputs (float arithmetic; exact stacks: `exact_inverse`)."""
        if self.swap:
            y1, y2 = y2, y1
        x2 = unstep(self.beta, y2, self.g(y1, context))
        x1 = unstep(self.lam, y1, self.f(x2, context))
        return x1, x2

    def exact_forward(self, x1q, x2q, context=(), *, dtype=torch.float32, frac_bits=fxp.DEFAULT_FRAC_BITS):
        """The coupling on int64 fixed-point streams; F and G run in `dtype` on the dequantized stream.

        Returns (y1q, y2q, (rem1, rem2)), streams swapped like `forward`; the packed remainders
        (k1 and k2 bits per element) are what `exact_inverse` needs besides the outputs.
        """
        k1, k2 = self.exponents
        y1q, y2q, r1, r2 = fxp.coupling_forward(x1q, x2q, lambda t: self.f(t, context), lambda t: self.g(t, context),
                                                k1, k2, frac_bits, dtype)
        return (y2q, y1q, (r1, r2)) if self.swap else (y1q, y2q, (r1, r2))

    def exact_inverse(self, y1q, y2q, remainders, context=(), *, dtype=torch.float32,
                      frac_bits=fxp.DEFAULT_FRAC_BITS):
        """Bit-exact inverse of `exact_forward` (same context, dtype, frac_bits): returns (x1q, x2q)."""
        if self.swap:
            y1q, y2q = y2q, y1q
        k1, k2 = self.exponents
        return fxp.coupling_inverse(y1q, y2q, remainders[0], remainders[1], lambda t: self.f(t, context),
                                    lambda t: self.g(t, context), k1, k2, frac_bits, dtype)

    # Generated, printable programs of the same equations (F and G are call_module leaves).
    def graph(self, which: str, num_context: int, *, dtype=torch.float32,
              frac_bits: int = fxp.DEFAULT_FRAC_BITS) -> fx.GraphModule:
        """An fx.GraphModule of this coupling's equations.

        `which`: "forward" / "inverse" (float, (a, b, *context) -> (c, d)), or "exact_forward"
        ((x1q, x2q, *context) -> (y1q, y2q, rem1, rem2)) / "exact_inverse"
        ((y1q, y2q, rem1, rem2, *context) -> (x1q, x2q)) on int64 fixed-point streams, F and G in
        `dtype` (`dtype`/`frac_bits` only matter for the exact programs).
        """
        # λ, β and swap are runtime attributes (MEFTConfig sets them; tests flip them): part of the key
        key = (which, num_context, self.lam, self.beta, self.swap)
        if which.startswith("exact"):
            key += (dtype, frac_bits)
        if key not in self._graphs:
            if which.startswith("exact"):
                self._graphs[key] = _exact_coupling_graph(self, which, num_context, dtype, frac_bits)
            else:
                self._graphs[key] = _coupling_graph(self, which, num_context)
        return self._graphs[key]


def _coupling_graph(c: Coupling, which: str, n_ctx: int) -> fx.GraphModule:
    root = nn.Module()
    root.F, root.G = c.F, c.G
    g = fx.Graph()
    names = ("x1", "x2") if which == "forward" else ("y1", "y2")
    a, b = g.placeholder(names[0]), g.placeholder(names[1])
    ctx = [g.placeholder(f"ctx_{i}") for i in range(n_ctx)]

    def lin(scale, prev, upd, inv):
        if scale == 1.0:
            return g.call_function(operator.sub if inv else operator.add, (prev, upd))
        if inv:
            return g.call_function(operator.truediv, (g.call_function(operator.sub, (prev, upd)), scale))
        return g.call_function(operator.add, (g.call_function(operator.mul, (prev, scale)), upd))

    if which == "forward":
        f = g.call_module("F", (b, *[ctx[i] for i in c.f_context]))
        y1 = lin(c.lam, a, f, False)
        gg = g.call_module("G", (y1, *[ctx[i] for i in c.g_context]))
        y2 = lin(c.beta, b, gg, False)
        g.output((y2, y1) if c.swap else (y1, y2))
    elif which == "inverse":
        y1, y2 = (b, a) if c.swap else (a, b)
        gg = g.call_module("G", (y1, *[ctx[i] for i in c.g_context]))
        x2 = lin(c.beta, y2, gg, True)
        f = g.call_module("F", (x2, *[ctx[i] for i in c.f_context]))
        x1 = lin(c.lam, y1, f, True)
        g.output((x1, x2))
    else:
        raise ValueError(f"which={which!r}: expected 'forward' or 'inverse'")
    return _codegen_module(root, g, which)


def _codegen_module(root: nn.Module, g: fx.Graph, which: str) -> fx.GraphModule:
    """Stamp a generated coupling program's provenance, lint it and wrap it (class CouplingExactInverse, ...)."""
    for n in g.nodes:
        n.meta["meft_pass"] = "codegen"
    g.lint()
    return fx.GraphModule(root, g, class_name="Coupling" + "".join(w.capitalize() for w in which.split("_")))


def _exact_coupling_graph(c: Coupling, which: str, n_ctx: int, dtype, frac_bits: int) -> fx.GraphModule:
    """The fixed-point coupling (meft_fx.fixed_point) as an fx program; F and G stay call_module leaves."""
    k1, k2 = c.exponents
    root = nn.Module()
    root.F, root.G = c.F, c.G
    g = fx.Graph()

    def call(fn, *args):
        return g.call_function(fn, args)

    def quantized(mod, stream, context_idx):
        out = g.call_module(mod, (call(fxp.dequantize, stream, frac_bits, dtype), *[ctx[i] for i in context_idx]))
        return call(fxp.quantize, out, frac_bits)

    if which == "exact_forward":
        x1q, x2q = g.placeholder("x1q"), g.placeholder("x2q")
        ctx = [g.placeholder(f"ctx_{i}") for i in range(n_ctx)]
        sd1 = call(fxp.shift_down, x1q, k1)
        y1q = call(operator.add, call(operator.getitem, sd1, 0), quantized("F", x2q, c.f_context))
        sd2 = call(fxp.shift_down, x2q, k2)
        y2q = call(operator.add, call(operator.getitem, sd2, 0), quantized("G", y1q, c.g_context))
        rems = (call(operator.getitem, sd1, 1), call(operator.getitem, sd2, 1))
        g.output(((y2q, y1q) if c.swap else (y1q, y2q)) + rems)
    elif which == "exact_inverse":
        a, b = g.placeholder("y1q"), g.placeholder("y2q")
        rem1, rem2 = g.placeholder("rem1"), g.placeholder("rem2")
        ctx = [g.placeholder(f"ctx_{i}") for i in range(n_ctx)]
        y1q, y2q = (b, a) if c.swap else (a, b)
        x2q = call(fxp.shift_up, call(operator.sub, y2q, quantized("G", y1q, c.g_context)), rem2, k2)
        x1q = call(fxp.shift_up, call(operator.sub, y1q, quantized("F", x2q, c.f_context)), rem1, k1)
        g.output((x1q, x2q))
    else:
        raise ValueError(f"which={which!r}: expected 'forward', 'inverse', 'exact_forward' or 'exact_inverse'")
    return _codegen_module(root, g, which)


# ----------------------------------------------------------------------------- RNG / autocast replay

class _RNG:
    """Generator state at one point of the forward, replayed without touching the global RNG."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accel = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.accel is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.set_rng_state(self.cpu)
            if self.accel is not None:
                torch.cuda.set_rng_state(self.accel, self.device)
            yield


def _autocast_state(device_type: str):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


# ----------------------------------------------------------------------------- the stack

class ReversibleStack(nn.Module):
    """A chain of couplings fed by one stream: h1 = h2 = x at the bottom.

    Called as `stack(x, *context)`; returns one stream (see `out_index`) or the mean of both.
    With `reversible=True` and grad enabled, the backward rebuilds activations (nothing cached).

    `numerics` is "float" (the paper's arithmetic, this module) or "exact": both streams in int64
    fixed point with `frac_bits` fractional bits, λ/β powers of two (`exponents`), bit-exact
    reconstruction (`meft_fx.exact`). Exact numerics apply in every mode: the reversible Function,
    `reversible=False` (same fixed-point arithmetic under ordinary autograd, straight-through) and
    no-grad/eval calls.
    """

    def __init__(self, couplings: Sequence[Coupling], num_context: int, out_index, reversible: bool = True,
                 has_random: bool = True, info: dict | None = None, numerics: str = "float",
                 frac_bits: int = fxp.DEFAULT_FRAC_BITS):
        super().__init__()
        self.couplings = nn.ModuleList(couplings)
        self.num_context = int(num_context)
        self.out_index = out_index  # 0, 1 or "mean"
        self.reversible = bool(reversible)
        self.has_random = bool(has_random)
        self.info = dict(info or {})
        if numerics not in NUMERICS:
            raise ValueError(f"numerics={numerics!r}: expected one of {', '.join(map(repr, NUMERICS))}")
        self.numerics = numerics
        self.frac_bits = int(frac_bits)
        if numerics == "exact":
            for i, c in enumerate(self.couplings):
                try:
                    c.exponents
                except ValueError as e:
                    raise ValueError(f"coupling {i}: exact numerics need λ and β to be powers of two: {e}") from None

    @property
    def exponents(self):
        """(k1, k2) of the couplings (λ = 2^-k1, β = 2^-k2) when they all share them, else a list per coupling."""
        ks = [c.exponents for c in self.couplings]
        return ks[0] if ks and all(k == ks[0] for k in ks) else ks

    def select(self, h1, h2):
        if self.out_index == "mean":
            return (h1 + h2) * 0.5
        return h2 if self.out_index == 1 else h1

    def _function_inputs(self, x, context):
        """The trainable parameters when the reversible Function should run, else None."""
        if self.reversible and torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            _refuse_sharded(params)
            if params or x.requires_grad or any(isinstance(c, torch.Tensor) and c.requires_grad for c in context):
                return params
        return None

    def forward(self, x, *context):
        if torch.compiler.is_dynamo_compiling():
            # Under torch.compile (bare or meft_fx.compile): the stack runs behind one graph break, its
            # couplings' F and G compiled (see meft_fx.compile); dynamo cannot trace the Function.
            return _behind_graph_break(self, x, *context)
        if self.numerics == "exact":
            from .exact import run_exact_stack
            return run_exact_stack(self, x, context)
        params = self._function_inputs(x, context)
        if params is not None:
            return _ReversibleFunction.apply(self, len(context), x, *context, *params)
        h1 = h2 = x
        for c in self.couplings:
            h1, h2 = c(h1, h2, context)
        return self.select(h1, h2)


def _behind_graph_break(stack: ReversibleStack, x, *context):
    """Run `stack` eagerly (outside dynamo), compiling its couplings' F and G first if nothing did."""
    from .compile import compile_couplings, compiled_couplings
    if not compiled_couplings(stack):
        compile_couplings(stack)  # default settings; call meft_fx.compile_couplings first to choose others
    return stack(x, *context)


_behind_graph_break = torch.compiler.disable(
    _behind_graph_break, reason="meft_fx reversible stack (autograd.Function with RNG replay and autograd.grad in "
    "backward); its couplings' F and G run compiled")


def _refuse_sharded(params) -> None:
    """FSDP2 sharding inside a stack would make the reversible backward silently drop gradients."""
    if params and torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if any(isinstance(p, DTensor) for p in params):
            raise RuntimeError(
                "ReversibleStack: some trainable parameters are still sharded (DTensor) when the stack runs: "
                "torch.distributed.fsdp.fully_shard was applied to a module inside the stack (a coupling, its F or "
                "G), or to a stack the converted model does not run for this call structure. The reversible "
                "backward recomputes F and G itself and cannot return gradients for sharded parameters. Apply "
                "fully_shard to the whole converted model (or a module that contains the ConvertedModule) instead.")


def _add(a, b):
    """a + b where None stands for a gradient known to be zero."""
    return b if a is None else a if b is None else a + b


def _scale(s: float, a):
    return None if a is None else (a if s == 1.0 else a * s)


def _half_backward(fn, args, inp, d_out, rng, autocast, rebuild, leaf_input: bool = True):
    """One half of a coupling: `out = scale·prev + fn(inp, *args)`.

    Recompute r = fn(inp) (same dropout masks, same autocast) and rebuild `prev = rebuild(r)` (r
    detached); if `d_out` is not None (None = known zero), backprop it through fn. Returns
    (prev, d_inp, {param: grad}, [grad per arg]). `leaf_input=False` feeds fn a view of the leaf,
    as in the forward graph, where the stream is not a leaf: autocast caches its low-precision cast
    of a leaf and would then sum the gradients of fn's several reads of the stream in bf16.
    """
    replay = rng.replay() if rng is not None else contextlib.nullcontext()
    if d_out is None:
        with torch.no_grad(), replay, torch.autocast(inp.device.type, dtype=autocast[1], enabled=autocast[0]):
            r = fn(inp, *args)
        return rebuild(r), None, {}, [None] * len(args)
    params = [p for p in fn.parameters() if p.requires_grad]
    grad_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.enable_grad(), replay, torch.autocast(inp.device.type, dtype=autocast[1], enabled=autocast[0]):
        u = inp.detach().requires_grad_(True)
        r = fn(u if leaf_input else u.view_as(u), *args)
    grads = torch.autograd.grad(r, [u, *params, *[args[i] for i in grad_args]], d_out.to(r.dtype), allow_unused=True)
    prev = rebuild(r.detach())
    pgrads = dict(zip(params, grads[1:1 + len(params)]))
    agrads = [None] * len(args)
    for i, gr in zip(grad_args, grads[1 + len(params):]):
        agrads[i] = gr
    return prev, grads[0], pgrads, agrads


# ---------------------------------------------------------------- pieces shared with meft_fx.exact

def _save_context(fctx, context) -> list:
    """Remember the non-tensor context on `fctx`; returns the tensors to `save_for_backward`."""
    fctx.n_ctx = len(context)
    fctx.tensor_pos = [i for i, v in enumerate(context) if isinstance(v, torch.Tensor)]
    fctx.other_context = {i: v for i, v in enumerate(context) if not isinstance(v, torch.Tensor)}
    return [context[i] for i in fctx.tensor_pos]


def _restore_context(fctx, tctx) -> list:
    """The context list again, float tensors detached (keeping requires_grad) for the recompute."""
    context = [None] * fctx.n_ctx
    for i, v in fctx.other_context.items():
        context[i] = v
    for i, t in zip(fctx.tensor_pos, tctx):
        context[i] = t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t
    return context


def _output_grads(stack, d_out):
    """(dy1, dy2) of the top streams from the gradient of `stack.select`; None = known zero."""
    if stack.out_index == "mean":
        return d_out * 0.5, d_out * 0.5
    if stack.out_index == 1:
        return None, d_out  # None: the other stream does not reach the output
    return d_out, None


class _Grads:
    """Accumulates parameter and context gradients over the couplings of one backward."""

    def __init__(self, n_ctx: int):
        self.params: dict = {}
        self.context = [None] * n_ctx

    def add(self, pg: dict, ag: list, idx) -> None:
        for p, gr in pg.items():
            self.params[p] = _add(self.params.get(p), gr)
        for j, gr in zip(idx, ag):
            self.context[j] = _add(self.context[j], gr)

    def result(self, dx, params) -> tuple:
        """The Function's backward return value for inputs (stack, n_ctx, x, *context, *params)."""
        return (None, None, dx, *self.context, *[self.params.get(p) for p in params])


class _ReversibleFunction(torch.autograd.Function):
    """forward: run the couplings without grad and keep only the top streams.

    Inputs are (stack, number of context values, x, *context, *trainable parameters); the
    parameters are inputs so that backward runs even when nothing upstream requires grad.
    """

    @staticmethod
    def forward(fctx, stack, n_ctx, x, *rest):
        context, params = rest[:n_ctx], rest[n_ctx:]
        record_rng = stack.training and stack.has_random
        fctx.autocast = _autocast_state(x.device.type)
        states = []
        h1 = h2 = x
        for c in stack.couplings:
            rf = _RNG(x.device) if record_rng else None
            y1 = step(c.lam, h1, c.f(h2, context))
            rg = _RNG(x.device) if record_rng else None
            y2 = step(c.beta, h2, c.g(y1, context))
            h1, h2 = (y2, y1) if c.swap else (y1, y2)
            states.append((rf, rg))
        fctx.stack, fctx.states, fctx.params = stack, states, params
        fctx.save_for_backward(h1, h2, *_save_context(fctx, context))
        return stack.select(h1, h2)

    @staticmethod
    def backward(fctx, d_out):
        stack = fctx.stack
        h1, h2, *tctx = fctx.saved_tensors
        context = _restore_context(fctx, tctx)
        grads = _Grads(fctx.n_ctx)
        dy1, dy2 = _output_grads(stack, d_out)
        for c, (rf, rg) in zip(reversed(stack.couplings), reversed(fctx.states)):
            if c.swap:
                h1, h2, dy1, dy2 = h2, h1, dy2, dy1
            # G half: y2 = β·x2 + G(y1)  →  dy1 += Gᵀdy2, x2 = (y2 − G(y1))/β
            g_args = [context[i] for i in c.g_context]
            x2, d_y1, pg, ag = _half_backward(c.G, g_args, h1, dy2, rg, fctx.autocast,
                                              lambda r: unstep(c.beta, h2, r.to(h2.dtype)))
            dy1 = _add(dy1, d_y1)
            grads.add(pg, ag, c.g_context)
            # F half: y1 = λ·x1 + F(x2)  →  dx2 = β·dy2 + Fᵀdy1, x1 = (y1 − F(x2))/λ, dx1 = λ·dy1
            f_args = [context[i] for i in c.f_context]
            x1, d_x2, pg, ag = _half_backward(c.F, f_args, x2, dy1, rf, fctx.autocast,
                                              lambda r: unstep(c.lam, h1, r.to(h1.dtype)))
            grads.add(pg, ag, c.f_context)
            h1, h2, dy1, dy2 = x1, x2, _scale(c.lam, dy1), _add(_scale(c.beta, dy2), d_x2)
        return grads.result(_add(dy1, dy2), fctx.params)
