"""`ReversibleStack`: a chain of couplings fed by one stream (h1 = h2 = x at the bottom).

Three ways it runs, all with the same generated programs and the same stream arithmetic:

* reversible and grad enabled (training): `ReversibleFunction`, nothing cached inside the stack;
* `reversible=False` with grad: ordinary autograd — through the forward programs when the
  arithmetic's programs are differentiable (float), else the arithmetic's straight-through
  `reference` (fixed point); the reference the reversible backward is tested against;
* no grad (eval, inference): the forward programs alone.

Under torch.compile the stack runs behind one graph break (dynamo cannot trace the Function),
its couplings' F and G compiled (`compile_couplings`).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import ReconstructionError
from . import fixed_point as fxp
from .arithmetic import exponent_of, make_arithmetic
from .codegen import inference_program
from .coupling import Coupling
from .function import ReversibleFunction
from .fused_steps import FusedSteps
from .sharded import GRAD_TRIGGER, split_trainable

__all__ = ["ReversibleStack", "StackRecord", "stacks_in"]


@dataclass(frozen=True)
class StackRecord:
    """Where a stack came from: the source module that held it, the MEFT method, the stream width."""

    owner: str = ""
    method: str = ""
    dim: int = 0


class ReversibleStack(nn.Module):
    """Called as `stack(x, *context)`; returns one stream (`out_index` 0 or 1) or the mean of both ("mean").

    `numerics` names the stream arithmetic (`meft_fx.runtime.arithmetic.ARITHMETICS`): "float"
    (the paper's) or "exact" (int64 — `stream_bits=32`: int32 — fixed point with `frac_bits` fractional bits, λ/β powers of two,
    bit-exact reconstruction). It can be changed after construction, like `reversible`.
    """

    def __init__(self, couplings: Sequence[Coupling], num_context: int, out_index, reversible: bool = True,
                 has_random: bool = True, record: StackRecord | None = None, numerics: str = "float",
                 frac_bits: int = fxp.DEFAULT_FRAC_BITS, stream_bits: int = 64):
        super().__init__()
        self.couplings = nn.ModuleList(couplings)
        self.num_context = int(num_context)
        self.out_index = out_index
        self.reversible = bool(reversible)
        self.has_random = bool(has_random)
        self.record = record or StackRecord()
        self._frac_bits, self._stream_bits = int(frac_bits), int(stream_bits)
        self.numerics = numerics
        self.__dict__["_compile_settings"] = None

    # ---------------------------------------------------------------------------- arithmetic
    @property
    def numerics(self) -> str:
        """The stream arithmetic's name ("exact" or "float"); setting it switches the stack's arithmetic."""
        return self.arithmetic.name

    @numerics.setter
    def numerics(self, name: str) -> None:
        arith = make_arithmetic(name, self._frac_bits, self._stream_bits)
        for i, c in enumerate(self.couplings):
            try:
                arith.check_scale(c.lam, "λ")
                arith.check_scale(c.beta, "β")
            except ValueError as e:
                raise ValueError(f"coupling {i}: {name} numerics cannot use its scales: {e}") from None
        self.__dict__["arithmetic"] = arith
        self.__dict__["_fused"] = None

    def set_streams(self, stream_bits: int, frac_bits: int) -> None:
        """Use `stream_bits`-wide fixed-point streams with `frac_bits` fractional bits (exact numerics)."""
        self._stream_bits, self._frac_bits = int(stream_bits), int(frac_bits)
        self.numerics = self.numerics

    @property
    def frac_bits(self) -> int:
        """Fractional bits of the fixed-point streams (used by exact numerics)."""
        return self._frac_bits

    @property
    def stream_bits(self) -> int:
        """The fixed-point streams' integer width, 64 or 32 (used by exact numerics)."""
        return self._stream_bits

    @property
    def exponents(self):
        """(k1, k2) with λ = 2^-k1, β = 2^-k2 when all couplings share them, else a list per coupling."""
        ks = [(exponent_of(c.lam, "λ"), exponent_of(c.beta, "β")) for c in self.couplings]
        return ks[0] if ks and all(k == ks[0] for k in ks) else ks

    @property
    def stored_bits_per_element(self) -> int:
        """Residue bits the reversible forward keeps per stream element, summed over the couplings."""
        a = self.arithmetic
        return sum(a.residue_bits(c.lam) + a.residue_bits(c.beta) for c in self.couplings)

    def program(self, i: int, which: str, dtype):
        """Coupling `i`'s generated `which` program for this stack's arithmetic and F/G dtype `dtype` (with its
        steps compiled, `arithmetic.fused`, when the couplings are compiled — not under torch.export)."""
        return self.couplings[i].program(which, self.running_arithmetic(), self.num_context, dtype)

    def running_arithmetic(self):
        """The arithmetic the programs run: `arithmetic`, fused with the couplings' compile settings when
        `compile_couplings` compiled them (`meft_fx.runtime.fused_steps`)."""
        settings = self.compile_settings
        if settings is None or torch.compiler.is_exporting():
            return self.arithmetic
        if self.__dict__["_fused"] is None:
            self.__dict__["_fused"] = self.arithmetic.fused(FusedSteps(settings))
        return self.__dict__["_fused"]

    def select(self, h1, h2):
        """The stack's output from its two final streams: one of them, or their mean (`out_index`)."""
        if self.out_index == "mean":
            return (h1 + h2) * 0.5
        return h2 if self.out_index == 1 else h1

    def decoded_output(self, h1, h2, dtype):
        """What the stack returns from its top streams, decoded to `dtype` (only the stream(s) it returns)."""
        decode = self.arithmetic.decode
        if self.out_index == "mean":
            return self.select(decode(h1, dtype), decode(h2, dtype))
        return decode(h2 if self.out_index == 1 else h1, dtype)

    def where(self, i) -> str:
        """'coupling I (layer)' for messages; 'the stack's input' for None."""
        if i is None:
            return "the stack's input"
        layer = self.couplings[i].record.layer
        return f"coupling {i}" + (f" ({layer})" if layer else "")

    @contextlib.contextmanager
    def errors_named(self, i, backward: bool = False):
        """Prefix arithmetic errors with `where(i)`; in the backward an overflow means a failed rebuild."""
        try:
            yield
        except fxp.FixedPointOverflow as e:
            if backward:
                raise ReconstructionError(f"exact reversible backward, {self.where(i)}: {e}; F or G is not "
                                          f"deterministic (see numerics='float' for a non-exact alternative)") from None
            raise fxp.FixedPointOverflow(f"{self.where(i)}: {e}") from None
        except (ValueError, TypeError) as e:
            if type(e) not in (ValueError, TypeError):
                raise
            raise type(e)(f"{self.where(i)}: {e}") from None

    # ---------------------------------------------------------------------------- running
    def run_programs(self, x, context, programs=None):
        """The forward programs alone, coupling after coupling (no Function; autograd sees what they do).
        `programs`: other forward programs to run in their place (generation's, with a KV cache)."""
        arith = self.arithmetic
        with self.errors_named(None):
            h1 = h2 = arith.encode(x)
        for i in range(len(self.couplings)):
            prog = self.program(i, "forward", x.dtype) if programs is None else programs[i]
            with self.errors_named(i):
                h1, h2, _, _ = prog(h1, h2, None, *context)
        return self.decoded_output(h1, h2, x.dtype)

    def _function_inputs(self, x, context):
        """The trainable parameters when the reversible Function should run, else None."""
        if self.reversible and torch.is_grad_enabled():
            params, sharded = split_trainable(self.couplings)
            _refuse_sharded(params)
            if sharded:  # FSDP reduces those halves' gradients; the trigger makes the backward run
                return params + [GRAD_TRIGGER]
            if params or x.requires_grad or any(isinstance(c, torch.Tensor) and c.requires_grad for c in context):
                return params
        return None

    def forward(self, x, *context):
        if torch.compiler.is_exporting():  # torch.export: an inference program (no residues)
            return self.run_programs(x, context, [inference_program(self.program(i, "forward", x.dtype))
                                                  for i in range(len(self.couplings))])
        if torch.compiler.is_dynamo_compiling():
            return _behind_graph_break(self, x, *context)
        params = self._function_inputs(x, context)
        if params is not None:
            self._warn_zero_tokens(x)
            return ReversibleFunction.apply(self, len(context), x, *context, *params)
        if torch.is_grad_enabled() and not self.arithmetic.differentiable:
            return self.arithmetic.reference(self, x, context)
        return self.run_programs(x, context)

    def _warn_zero_tokens(self, x) -> None:
        """Float numerics, first reversible call: warn when some token's stream vector is exactly zero."""
        if self.numerics != "float" or self.__dict__.get("_zero_tokens_checked"):
            return
        self.__dict__["_zero_tokens_checked"] = True
        if x.dim() >= 2 and bool((x.detach() == 0).all(-1).any()):
            warnings.warn(ZERO_TOKENS_WARNING, stacklevel=3)

    # ---------------------------------------------------------------------------- torch.compile
    def compile_couplings(self, *, backend="inductor", mode=None, options=None, dynamic=True) -> None:
        """Compile every coupling's F and G (`nn.Module.compile`); the programs call them compiled, and run the
        exact arithmetic's update and restore as compiled kernels of the same settings (`running_arithmetic`)."""
        for c in self.couplings:
            for m in (c.F, c.G):
                m.compile(backend=backend, mode=mode, options=options, dynamic=dynamic)
        self.__dict__["_compile_settings"] = dict(backend=backend, mode=mode, options=options, dynamic=dynamic)
        self.__dict__["_fused"] = None

    @property
    def compile_settings(self) -> dict | None:
        """The settings of the last `compile_couplings` (None: not compiled by it)."""
        return self.__dict__["_compile_settings"]

    @property
    def compiled(self) -> bool:
        """True when every coupling's F and G is compiled."""
        return all(getattr(m, "_compiled_call_impl", None) is not None for c in self.couplings for m in (c.F, c.G))


ZERO_TOKENS_WARNING = (
    "meft_fx (numerics='float'): the reversible stack's input has token vectors that are exactly zero (a "
    "zero-initialised [CLS] token without position embeddings, as in a fresh BEiT). The float inverse rebuilds "
    "them as rounding noise around zero, and a ReLU's kink or a LayerNorm of a near-zero vector turns that noise into "
    "wrong gradients (relative error 1e2-1e4 measured on a tiny BEiT with MEFT2). numerics='exact' (the default) "
    "rebuilds them bit for bit")


def stacks_in(module: nn.Module) -> list[ReversibleStack]:
    """Every `ReversibleStack` inside `module` (itself included), in `module.modules()` order."""
    return [m for m in module.modules() if isinstance(m, ReversibleStack)]


def default_compile_settings() -> dict:
    """Inductor settings of a stack compiled lazily under a bare torch.compile (eager's dropout masks)."""
    return dict(backend="inductor", mode=None, options={"fallback_random": True}, dynamic=True)


def _behind_graph_break(stack: ReversibleStack, x, *context):
    """Run `stack` eagerly (outside dynamo), compiling its couplings' F and G first if nothing did."""
    if not stack.compiled:
        stack.compile_couplings(**default_compile_settings())
    return stack(x, *context)


_behind_graph_break = torch.compiler.disable(
    _behind_graph_break, reason="meft_fx reversible stack (autograd.Function with RNG replay and autograd.grad in "
    "backward); its couplings' F and G run compiled")


def _refuse_sharded(params) -> None:
    """`params`: the trainable parameters of the halves that are not FSDP2 units. One still sharded (DTensor)
    belongs to a unit the programs never call (a coupling, the stack), whose hooks never gather it."""
    if params and torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if any(isinstance(p, DTensor) for p in params):
            raise RuntimeError(
                "ReversibleStack: some trainable parameters are still sharded (DTensor) when the stack runs: "
                "torch.distributed.fsdp.fully_shard was applied to a module the reversible programs do not call "
                "(a Coupling or the ReversibleStack itself), so nothing gathers its parameters. Shard each "
                "coupling's F and G on their own (meft_fx.shard(model) does, with the rest of the model in the "
                "root unit), or apply fully_shard to the whole converted model only.")
