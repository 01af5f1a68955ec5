"""The reversible runtime: stream arithmetic, couplings, their generated programs, the stack.

    arithmetic   float / fixed-point streams behind one interface (ARITHMETICS table)
    fixed_point  int64 fixed-point primitives (quantize, shifts with kept bits, checksum)
    fused_steps  a compiled stack's fixed-point update and restore, one compiled kernel each
    coupling     Coupling: F, G, λ, β, swap; its generated programs (cached)
    codegen      the forward / inverse / backward programs of a coupling, as fx GraphModules
    replay       RNG / autocast replay and the fused recompute + VJP the backward program calls
    saved        context save/restore and gradient accumulation of the Function
    function     ReversibleFunction: the one autograd.Function over a stack
    stack        ReversibleStack: the module a converted graph calls
    sharded      halves that are FSDP2 units: what the Function takes, gathering for copies of a half
    units        the halves as FSDP2 units across a converted module's captured graphs

Nothing here imports the passes, the conversion or inspection.
"""
from .arithmetic import ARITHMETICS, FixedPointStreams, FloatStreams, StreamArithmetic, make_arithmetic
from .coupling import Coupling, CouplingRecord
from .function import ReversibleFunction
from .stack import ReversibleStack, StackRecord, stacks_in

__all__ = ["ARITHMETICS", "FixedPointStreams", "FloatStreams", "StreamArithmetic", "make_arithmetic", "Coupling",
           "CouplingRecord", "ReversibleFunction", "ReversibleStack", "StackRecord",
           "stacks_in"]
