"""`explain`: what a conversion rewrote, and why it left other regions alone.

Activation memory per coupling (`CouplingInfo.activation_bytes_saved_per_token`) is measured, not
modelled: each coupling's F and G run once, in training mode and with grad enabled, on a small
probe input under `torch.autograd.graph.saved_tensors_hooks`, and the bytes of every distinct
tensor storage autograd saves for backward are added up — what ordinary autograd would cache for
that coupling during fine-tuning (pretrained weights frozen, adapters trainable). Parameters,
buffers and the stack's context inputs (masks, sizes, rotary tables: held by the caller anyway)
are not counted. The probe input is built from the shapes recorded at capture (a symbolic batch
or sequence size takes the value it had in the example inputs), and the probe streams flow
through the couplings in order, so every coupling sees realistic inputs. The result is divided by
the number of tokens of the probe (every dimension of the stream but the last) and the reversible
runtime's own cache is subtracted: it keeps the two top streams per stack (2 · hidden size ·
element size bytes per token, shared among the stack's couplings; with exact numerics the streams
are int64, 8 bytes per element, and each coupling also keeps k1 + k2 remainder bits per element
for λ = 2^-k1, β = 2^-k2). RNG states kept for dropout replay (and exact numerics' checksums) are
a few KB per coupling whatever the batch, so they are not per-token and not counted. With
`MEFTConfig(reversible=False)` the runtime is ordinary autograd and nothing is saved. Attention
scores grow with sequence length, so the per-token figure holds for the sequence length of the
example inputs the model was captured with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..capture import module_mode
from ..chunked_loss import STATE
from ..nn.adapter import Adapter
from ..nn.head_loss import ChunkedHeadLoss
from ..nn.sliced_ffn import sliced_gated_ffn
from ..passes.fx.dataflow import node_value
from ..runtime import ReversibleStack
from ..stream_width import bf16_stream_bits


@dataclass
class CouplingInfo:
    """One reversible coupling: which source blocks became F and G, with its scales.

    `activation_bytes_saved_per_token` is what ordinary autograd would cache for this coupling's
    F and G per token minus what the reversible runtime keeps (see the module docstring for the
    method); None when it was not estimated. `autograd_bytes_per_token` and `kept_bytes_per_token`
    are the two terms.
    """

    index: int
    stack: str              # module path of the ReversibleStack
    layer: str              # source module path of the transformer layer
    F: list                 # [(source module path, kind)], kind in attention / ffn / adapter
    G: list
    lam: float
    beta: float
    swap: bool
    numerics: str
    adapters: dict = field(default_factory=dict)   # {"F": [adapter module names], "G": [...]}
    activation_bytes_saved_per_token: float | None = None
    autograd_bytes_per_token: float | None = None
    kept_bytes_per_token: float | None = None


@dataclass(frozen=True)
class StoredState:
    """What one reversible stack keeps for its backward, in bits per element of the hidden state (× hidden × tokens
    for bytes), beside gradient checkpointing, which keeps one hidden-state tensor per layer in the model's dtype.

    `stream_bits`: each of the two top streams (64 / 32: int64 / int32 fixed point, `fixed_point`; the dtype's bits
    for float streams);
    `layer_bits`: the residues stored per layer (k1 + k2 for λ = 2^-k1, β = 2^-k2);
    `bf16_stream_bits`: the streams convert would choose for the same model in bf16 (`meft_fx.stream_width`, from
    the reach it measured); None: this stack's."""

    stack: str
    layers: int
    stream_bits: int
    layer_bits: int
    dtype: str
    dtype_bits: int
    fixed_point: bool = True
    bf16_stream_bits: int | None = None

    @property
    def total_bits(self) -> int:
        """Bits per element of the hidden state for the whole stack: two streams and every layer's residues."""
        return 2 * self.stream_bits + self.layers * self.layer_bits

    def total_bits_in(self, dtype_bits: int) -> int:
        """`total_bits` for the same model in a dtype of `dtype_bits` bits: fixed-point streams (int64, int32) keep
        their width (in bf16: the width convert would choose there, when known), float streams take the dtype's."""
        streams = self.stream_bits if self.fixed_point else dtype_bits
        if self.fixed_point and dtype_bits == 16 and self.bf16_stream_bits:
            streams = self.bf16_stream_bits
        return 2 * streams + self.layers * self.layer_bits

    def checkpointing_bits(self, dtype_bits: int | None = None) -> int:
        """What gradient checkpointing keeps per element for the same layers: one tensor per layer."""
        return self.layers * (dtype_bits or self.dtype_bits)

    def __str__(self) -> str:
        ckpt = self.checkpointing_bits()
        bf16 = "" if self.dtype_bits == 16 else (
            f"; in bf16 {self.total_bits_in(16)} against checkpointing's {self.checkpointing_bits(16)}, "
            f"{self.total_bits_in(16) / self.checkpointing_bits(16):.2f}×")
        return (f"{self.stack}: 2 top streams × {self.stream_bits} + {self.layers} layers × {self.layer_bits} = "
                f"{self.total_bits} bits per element of the hidden state ({self.total_bits / ckpt:.2f}× gradient "
                f"checkpointing's {self.layers} × {self.dtype_bits} = {ckpt} in {self.dtype}{bf16})")


def stored_state(name: str, stack: ReversibleStack, bf16_streams: int | None = None) -> StoredState:
    """The `StoredState` of `stack` (its dtype: its first floating-point parameter's); `bf16_streams`: see
    `StoredState.bf16_stream_bits`."""
    dtype = next((p.dtype for p in stack.parameters() if p.is_floating_point()), torch.float32)
    a = stack.arithmetic
    n = max(1, len(stack.couplings))
    return StoredState(name, len(stack.couplings), 8 * a.stream_itemsize(dtype), stack.stored_bits_per_element // n,
                       str(dtype).replace("torch.", ""), 8 * dtype.itemsize, a.powers_of_two, bf16_streams)


@dataclass
class Explanation:
    """Report returned by `meft_fx.explain`. `str()` is a readable table.

    `method`: the method the couplings use; `method_reason`: why convert used it (method="auto" chooses per model).
    `couplings`: one `CouplingInfo` per coupling, bottom to top. `unmatched`: one line per region
    the analysis looked at and did not rewrite, each with the reason (and the pass that decided).
    `chunked`: one line per thing that runs in chunks (a vocabulary head's loss, FFN halves).
    `generation`: per converted module, whether `generate()` runs with a KV cache (and why not).
    `streams`: per converted module, the exact streams' width convert chose and why (`meft_fx.stream_width`).
    `starting_points`: per converted module, how far it started from the original model when converted, the
    scale chosen and the bits it stores per element per layer (`meft_fx.starting_point.StartingPoint`).
    `stored`: per reversible stack, the bits per element of the hidden state it keeps for the backward (two top
    streams and every layer's residues) beside gradient checkpointing's (`StoredState`).
    """

    couplings: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    method: str = ""
    method_reason: str = ""  # why convert used the method (MEFTConfig.method_reason)
    memory_note: str = ""
    chunked: list = field(default_factory=list)  # lines: what runs in chunks (the head's loss, FFN halves)
    generation: list = field(default_factory=list)  # lines: how generate() runs (with a KV cache or why not)
    starting_points: dict = field(default_factory=dict)  # {converted module: StartingPoint} (meft_fx.starting_point)
    streams: dict = field(default_factory=dict)  # {converted module: StreamChoice} (meft_fx.stream_width)
    stored: list = field(default_factory=list)  # one StoredState per stack: bits per element kept for the backward

    @property
    def activation_bytes_saved_per_token(self) -> float | None:
        """Sum over couplings (None when not estimated)."""
        vals = [c.activation_bytes_saved_per_token for c in self.couplings]
        return None if not vals or any(v is None for v in vals) else float(sum(vals))

    def _call_label(self, c) -> str:
        """The coupling's layer; "(call i/n)" added for a layer its stack calls n times (ALBERT's shared layer)."""
        calls = [o for o in self.couplings if o.stack == c.stack and o.layer == c.layer]
        if len(calls) < 2:
            return c.layer or "?"
        return f"{c.layer} (call {calls.index(c) + 1}/{len(calls)})"

    def __str__(self) -> str:
        def blocks(bs, layer):
            out = []
            for m, k in bs:
                if k == "adapter":
                    out.append(m if m and m != "adapter" else "adapter")  # e.g. "none (...)": adds nothing
                    continue
                rel = m[len(layer) + 1:] if layer and m.startswith(layer + ".") else (m or "?")
                out.append(f"{rel} [{k}]")
            s = " + ".join(out)
            return s + " + adapter" if any(k != "adapter" for _, k in bs) else s

        numerics = sorted({c.numerics for c in self.couplings})
        lines = [f"meft_fx: {len(self.couplings)} reversible coupling(s), method {self.method}, "
                 f"numerics {'/'.join(numerics) or '?'}"]
        if self.method_reason:
            lines.append(f"why {self.method}: {self.method_reason}")
        rows = [("#", "layer", "F", "G", "λ", "β", "swap", "saved/token")]
        for c in self.couplings:
            rows.append((str(c.index), self._call_label(c), blocks(c.F, c.layer), blocks(c.G, c.layer), f"{c.lam:g}", f"{c.beta:g}",
                         "yes" if c.swap else "no", format_bytes(c.activation_bytes_saved_per_token)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for j, r in enumerate(rows):
            lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        total = self.activation_bytes_saved_per_token
        if total is not None:
            cached = sum(c.autograd_bytes_per_token for c in self.couplings)
            kept = sum(c.kept_bytes_per_token for c in self.couplings)
            pct = f" ({100 * total / cached:.0f}%)" if cached else ""
            lines.append(f"activations per token: autograd would cache {format_bytes(cached)}, the reversible runtime keeps "
                         f"{format_bytes(kept)}: saves {format_bytes(total)}{pct}")
        elif self.memory_note:
            lines.append(f"activations per token: not estimated ({self.memory_note})")
        if self.stored:
            lines.append("kept for the backward (bits per element of the hidden state):")
            lines.extend(f"  - {st}" for st in self.stored)
        if self.streams:
            lines.append("exact streams (chosen by convert, MEFTConfig.stream_bits=None):")
            lines.extend(f"  - {name}: {choice}" for name, choice in self.streams.items())
        if self.starting_points:
            lines.append("starting point (distance from the original model at conversion):")
            lines.extend(f"  - {name}: {point}" for name, point in self.starting_points.items())
        if self.chunked:
            lines.append("in chunks:")
            lines.extend(f"  - {u}" for u in self.chunked)
        if self.generation:
            lines.append("generation:")
            lines.extend(f"  - {u}" for u in self.generation)
        if self.unmatched:
            lines.append("not rewritten:")
            lines.extend(f"  - {u}" for u in self.unmatched)
        return "\n".join(lines)


def format_bytes(n) -> str:
    """"123 B", "4.5 KiB", "6.7 MiB" ... ("?" for None)."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _add_converted(rep: Explanation, name: str, m: nn.Module) -> None:
    """What a converted module says of itself: regions not rewritten, generation, streams, starting point."""
    rep.unmatched.extend(u for u in m.meft_unmatched if u not in rep.unmatched)
    rep.method_reason = rep.method_reason or getattr(m, "method_reason", "")
    label = getattr(m, 'owner', '') or name or type(m).__name__
    line = generation_line(m)
    if line:
        rep.generation.append(f"{label}: {line}")
    if getattr(m, "starting_point", None) is not None:
        rep.starting_points[label] = m.starting_point
    if getattr(m, "stream_choice", None) is not None:
        rep.streams[label] = m.stream_choice


def explain(module: nn.Module, estimate_memory: bool = True) -> Explanation:
    """Describe the couplings in a module returned by `meft_fx.convert`.

    With `estimate_memory` (default), F and G of every coupling run once on a small probe input to
    measure the activation bytes per token the reversible runtime saves (see this module's
    docstring); this takes about as long as one small forward.

    Raises ValueError if the module holds no reversible stack (was it converted?).
    """
    rep = Explanation(method=getattr(getattr(module, "meft_config", None), "method", ""))
    i = 0
    owners, choices = {}, {}
    stacks = []
    for name, m in module.named_modules():
        if hasattr(m, "meft_unmatched"):
            _add_converted(rep, name, m)
            owners[name], choices[name] = getattr(m, "owner", ""), getattr(m, "stream_choice", None)
        if not isinstance(m, ReversibleStack):
            continue
        holder = max((k for k in owners if name.startswith(k + ".") or k == ""), key=len, default=None)
        prefix = owners.get(holder, "") if holder is not None else ""

        def full(path, prefix=prefix):
            return f"{prefix}.{path}" if prefix and path and path != "adapter" else (path or prefix)

        rep.method = rep.method or m.record.method
        infos = []
        for c in m.couplings:
            info = CouplingInfo(index=i, stack=name, layer=full(c.record.layer),
                                F=[(full(p) if k != "adapter" else p, k) for p, k in c.record.F],
                                G=[(full(p) if k != "adapter" else p, k) for p, k in c.record.G], lam=c.lam, beta=c.beta,
                                swap=c.swap, numerics=m.numerics,
                                adapters={"F": adapter_names(c.F), "G": adapter_names(c.G)})
            rep.couplings.append(info)
            infos.append(info)
            i += 1
        stacks.append((name, m, infos))
        if m.reversible:
            rep.stored.append(stored_state(name, m, bf16_stream_bits(choices.get(holder))))
    if not rep.couplings:
        raise ValueError(f"{type(module).__name__} has no reversible coupling; was it returned by meft_fx.convert?")
    rep.chunked = chunked_lines(module, stacks)
    if estimate_memory:
        notes = []
        for name, stack, infos in stacks:
            try:
                x, context = probe_inputs(module, name)
                measure_activation_bytes(stack, x, context, infos)
            except Exception as e:  # noqa: BLE001 - the estimate is best effort; the report says why
                notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        rep.memory_note = "; ".join(notes)
    return rep


def chunked_lines(module: nn.Module, stacks) -> list:
    """What runs in chunks: the head's loss (in the model's training forward or in a program), FFN halves."""
    lines = []
    state = module.__dict__.get(STATE)
    if state is not None:
        lines.append(f"vocabulary head + cross-entropy after {state.body}: in training, {state.mode} blocks of "
                     f"{format_bytes(state.chunk_bytes)} of logits (outputs.logits is None then); "
                     f"{sum(len(v) for v in state.tails.values())} call structure(s) captured")
    for name, m in module.named_modules():
        if isinstance(m, ChunkedHeadLoss):
            lines.append(f"{name}: head + cross-entropy in the program, in training {m.mode} blocks of "
                         f"{format_bytes(m.chunk_bytes)} of logits")
    for name, stack, _ in stacks:
        plans = [(h, p) for c in stack.couplings for h, p in c.chunks.items()]
        if plans:
            halves = sorted({h for h, _ in plans})
            lines.append(f"{name}: {'/'.join(halves)} of {len(plans)} coupling(s) (position-wise) over the tokens in "
                         f"chunks of ≤ {format_bytes(plans[0][1].chunk_bytes)} of their widest activation")
        floor = max((p.min_rows for _, p in plans), default=1)
        if floor > 1:
            lines.append(f"{name}: routed experts: at least {floor} tokens per chunk (MIN_EXPERT_ROWS rows per expert), "
                         "whatever the budget (every chunk re-reads all the experts' weights)")
        sliced = sum(p.compiled_width is not None for _, p in plans)
        if sliced:
            lines.append(f"{name}: the gated FFN of {sliced} of them in slices of its intermediate width (same budget), "
                         "back-propagated while the backward recomputes it (sliced_ffn); compiled: in token chunks")
        whole = sum(_slices_ffn(getattr(c, h)) for c in stack.couplings for h in ("F", "G") if h not in c.chunks)
        if whole:
            lines.append(f"{name}: the gated FFN inside {whole} whole-layer {'half' if whole == 1 else 'halves'} (not "
                         "position-wise: run whole) in slices of its intermediate width, back-propagated while the "
                         "backward recomputes it (sliced_ffn); compiled: the plain ops")
    return lines


def _slices_ffn(half: nn.Module) -> bool:
    """Does `half`'s graph run a gated FFN in slices (`sliced_gated_ffn`)?"""
    graph = getattr(half, "graph", None)
    return graph is not None and any(n.target is sliced_gated_ffn for n in graph.nodes)


def generation_line(conv: nn.Module) -> str:
    """How generate() runs through a converted module ("" when no cache was planned or refused)."""
    reason = getattr(conv, "cache_unsupported", None)
    if reason:
        return f"generate() runs without a KV cache: {reason}"
    plan = conv.__dict__.get("_cache_plan")
    if plan is None:
        return ""
    return (f"generate() with a KV cache: {len(plan.names)} layers' attention reads and extends the model's cache "
            f"(checked on the example: relative difference {plan.check_error:.1e} to the captured graph)")


def adapter_names(mod: nn.Module) -> list:
    """Names of the MEFT adapters inside F or G (`meft_adapter_*` modules)."""
    return [n for n, m in mod.named_modules() if isinstance(m, Adapter)]


# ----------------------------------------------------------------------------- the probe

def _hint(d) -> int:
    if isinstance(d, torch.SymInt):
        h = getattr(d.node, "hint", None)
        if h is None:
            raise ValueError(f"size {d} has no example value")
        return int(h)
    return int(d)


def _materialize(v, device):
    """A concrete value like the (fake) value `v` recorded at capture."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.SymInt):
        return _hint(v)
    shape, dtype = getattr(v, "shape", None), getattr(v, "dtype", None)  # tensors, fake tensors, TensorMetadata
    if shape is None or dtype is None:
        if isinstance(v, (tuple, list)):
            return type(v)(_materialize(x, device) for x in v)
        raise ValueError(f"cannot build a probe value like {type(v).__name__}")
    shape = [_hint(d) for d in shape]
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def probe_inputs(module: nn.Module, stack_path: str):
    """(stream, context) like those the stack at `stack_path` was called with at capture.

    Built from the call node's recorded values in the GraphModule that owns the stack.
    """
    parent_path, _, child = stack_path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    graph = getattr(parent, "graph", None)
    if graph is None:
        raise ValueError("the stack is not called from a graph")
    stack = parent.get_submodule(child)
    try:
        device = next(stack.parameters()).device
    except StopIteration:  # pragma: no cover
        device = torch.device("cpu")
    for n in graph.nodes:
        if n.op == "call_module" and n.target == child:
            vals = []
            for a in n.args:
                if isinstance(a, torch.fx.Node):
                    v = node_value(a)
                    if v is None:
                        raise ValueError(f"no recorded value for {a.name}")
                    vals.append(_materialize(v, device))
                else:
                    vals.append(a)
            return vals[0], tuple(vals[1:])
    raise ValueError(f"no call of {child} in the graph")


def _saved_bytes(fn, exclude: set) -> int:
    """Bytes of distinct tensor storages autograd saves while running `fn` (minus `exclude`)."""
    seen = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            key = (s.data_ptr(), str(t.device))
            if key not in exclude:
                seen[key] = s.nbytes()
        except Exception:  # noqa: BLE001 - tensors without storage (wrappers) count their elements
            seen[("id", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _storage_keys(tensors) -> set:
    keys = set()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            try:
                keys.add((t.untyped_storage().data_ptr(), str(t.device)))
            except Exception:  # noqa: BLE001
                pass
    return keys


def measure_activation_bytes(stack: ReversibleStack, x: torch.Tensor, context: tuple, infos: list) -> None:
    """Fill the memory fields of `infos` (one per coupling of `stack`) by running the probe."""
    tokens = max(1, x.numel() // max(1, x.shape[-1]))
    dim = x.shape[-1]
    n = max(1, len(stack.couplings))
    exclude = _storage_keys([*stack.parameters(), *stack.buffers(), *context])
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), module_mode(stack, True), torch.enable_grad():
        h1 = h2 = x
        for c, info in zip(stack.couplings, infos):
            a = h1.detach().requires_grad_(True)
            b = h2.detach().requires_grad_(True)

            nbytes, (h1, h2) = _saved_bytes(lambda c=c, a=a, b=b: c(a, b, context), exclude)  # the float equations
            autograd = nbytes / tokens
            arith = stack.arithmetic  # two top streams per stack + the residue bits per element per coupling
            kept = autograd if not stack.reversible else \
                2 * dim * arith.stream_itemsize(x.dtype) / n + (arith.residue_bits(c.lam) + arith.residue_bits(c.beta)) * dim / 8
            info.autograd_bytes_per_token = autograd
            info.kept_bytes_per_token = kept
            info.activation_bytes_saved_per_token = autograd - kept
