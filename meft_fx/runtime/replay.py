"""Replaying a coupling's forward in the backward: RNG states, autocast, and the fused recompute + VJP.

The generated programs call two functions of this module:

* `record_rng(tape, half)` in the forward program, just before F or G runs: the generator state
  there is kept on the coupling's `Tape` (when it records: training with random ops);
* `replay_vjp(tape, half, block, stream, cotangent, *context)` in the backward program: runs the
  block again under the same RNG state and autocast, back-propagates `cotangent` through it at
  once, accumulates the parameter and context gradients on the tape's `GradAccumulator`, and
  returns (the block's output, detached; the gradient of its stream input). Running F and G one
  at a time keeps only one block's activations alive. With `input_grad=False` (F of the bottom
  coupling when nothing below the stack wants a gradient) the stream's gradient is not asked for,
  so autograd back-propagates only as far as the trainable parameters: e.g. MEFT3's F at the
  bottom runs its attention backward no more, only its adapter's.

Like `torch.utils.checkpoint`, the global RNG is never reseeded: states are restored inside
`torch.random.fork_rng`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .chunks import ChunkPlan, run_in_chunks, vjp_in_chunks
from .sharded import is_sharded
from .saved import GradAccumulator

__all__ = ["RNGState", "AutocastState", "Tape", "record_rng", "replay_vjp"]


class RNGState:
    """The generator state at one point of the forward, replayed without touching the global RNG."""

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


@dataclass(frozen=True)
class AutocastState:
    """Whether autocast was on for `device_type`, and its dtype, when the forward ran."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device_type: str) -> "AutocastState":
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def restore(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@dataclass
class Tape:
    """What one coupling's forward leaves for its backward besides the streams (see the module docstring)."""

    device: torch.device
    autocast: AutocastState
    record: bool                      # keep RNG states (training with random ops)
    rng: dict = field(default_factory=dict)
    grads: GradAccumulator | None = None
    leaf_input: bool = True
    input_grads: bool = True          # the coupling's input streams need gradients (False: the bottom
                                      # coupling of a stack whose input needs none)


def record_rng(tape: Tape | None, half: str) -> None:
    """Keep the generator state before `half` ("F" or "G") runs; nothing when `tape` is None or not recording."""
    if tape is not None and tape.record:
        tape.rng[half] = RNGState(tape.device)


def replay_vjp(tape: Tape, half: str, block: torch.nn.Module, stream: torch.Tensor, cotangent, *context,
               chunk: ChunkPlan | None = None, input_grad: bool = True, reuse_input: bool = False,
               grad_into: torch.Tensor | None = None):
    """Recompute `block(stream, *context)` as the forward ran it and back-propagate `cotangent`.

    Returns (output, d_stream); `cotangent` None means a gradient known to be zero (then the block
    only runs, without grad, and d_stream is None). `chunk`: the block is position-wise and ran in
    chunks of tokens (`meft_fx.runtime.chunks`); so do its recompute and back-propagation.
    `input_grad=False`: d_stream is not wanted (returned as None), so autograd stops at the
    parameters and context tensors that need gradients. `grad_into`: a gradient to add d_stream to,
    in place (returned as d_stream). `reuse_input=True`: `stream` is the caller's temporary, which
    a chunked block's output may overwrite.
    """
    rng = tape.rng.get(half)
    replay = rng.replay() if rng is not None else contextlib.nullcontext()
    if cotangent is None:
        with torch.no_grad(), replay, tape.autocast.restore():
            out = (block(stream, *context) if chunk is None
                   else run_in_chunks(block, stream, chunk, *context, reuse_input=reuse_input))
        return out, grad_into
    sharded = is_sharded(block)  # FSDP2: its parameters' gradients go to FSDP, through .grad (`backprop`)
    params = [] if sharded else [p for p in block.parameters() if p.requires_grad]
    ctx = [c for c in context if isinstance(c, torch.Tensor) and c.requires_grad]
    differentiated = [*params, *ctx]
    with torch.enable_grad(), replay, tape.autocast.restore():
        out, d_in, grads = vjp_in_chunks(block, tape.leaf_input, stream, cotangent, differentiated, chunk,
                                         input_grad, reuse_input, grad_into, context, accumulate=sharded)
    tape.grads.add(zip(differentiated, grads))
    return out, d_in
