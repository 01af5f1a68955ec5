"""`MEFTConfig`: every knob of the conversion, validated when it is built."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

from .nn.head_loss import DEFAULT_CHUNK_BYTES
from .runtime.arithmetic import ARITHMETICS, exponent_of
from .runtime.fixed_point import DEFAULT_FRAC_BITS, MAX_FRAC_BITS, STREAM_DTYPES


@dataclass(frozen=True)
class MethodSpec:
    """One MEFT method (Table 1 of the paper): what F and G are, λ/β, swap, which stream is pretrained.

    F / G: "attention" (the layer's attention sub-block(s)), "ffn" (its FFN sub-block), "layer"
    (the whole layer) or "adapter" (an adapter alone). lam / beta: the paper's scales (float
    numerics); a scale below 1 marks a scaled stream, which exact numerics scale by 2^-k instead.
    attention_adapter: a sequential adapter after each attention sub-block (besides the parallel
    one beside the FFN). pretrained: the half ("F" or "G") whose output carries the pretrained
    chain, so the stream it writes is the one to return (`output_stream`).
    """

    F: str
    G: str
    lam: float
    beta: float
    swap: bool
    attention_adapter: bool
    pretrained: str

    def exact_scales(self, k: int) -> tuple[float, float]:
        """(λ, β) under exact numerics: each scaled stream gets 2^-k, the others 1."""
        return (2.0 ** -k if self.lam != 1.0 else 1.0, 2.0 ** -k if self.beta != 1.0 else 1.0)

    def output_stream(self, output: str):
        """Which top stream a stack returns: 0 (h1), 1 (h2) or "mean" (`MEFTConfig.output`)."""
        if output == "mean":
            return "mean"
        written = 0 if self.pretrained == "F" else 1  # F writes stream 1, G stream 2
        return 1 - written if self.swap else written


#: The method table: everything that differs between MEFT1, MEFT2 and MEFT3.
METHODS = {
    "meft1": MethodSpec(F="layer", G="adapter", lam=0.1, beta=1.0, swap=True, attention_adapter=False, pretrained="F"),
    "meft2": MethodSpec(F="adapter", G="layer", lam=1.0, beta=0.1, swap=True, attention_adapter=False, pretrained="G"),
    "meft3": MethodSpec(F="attention", G="ffn", lam=0.1, beta=0.1, swap=False, attention_adapter=True,
                        pretrained="G"),
}
#: method="auto" (the default), chosen per model by `auto_method`: AUTO_PARALLEL for parallel-residual layers,
#: AUTO_PRE_NORM for pre-norm layers under exact numerics, else MEFT3. MEFT1 scales one stream, so it stores k bits
#: per element per layer where MEFT3 stores 2k: on SmolLM2-135M (pre-norm, 30 layers) k = 5, 214 bits per element in
#: bf16 with int32 streams (0.45x of checkpointing's 480) against MEFT3's k = 6, 424 bits (0.88x), perplexity
#: x1.017 against x1.010 (docs/real_decoder.md).
AUTO = "auto"
AUTO_PARALLEL = "meft1"
AUTO_PRE_NORM = "meft1"
NUMERICS = tuple(ARITHMETICS)
CAPTURES = ("auto", "export", "fx")
OUTPUTS = ("pretrained", "mean")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu")

#: numerics="exact": λ and β are powers of two 2^-k. With `lam`, `beta` and `scale_bits` None, convert measures the
#: starting point for k = SCALE_BITS_SEARCH[0], [1], ... and keeps the first within `start_tolerance`
#: (`meft_fx.starting_point`); EXACT_DEFAULT_K is what a config not yet measured (`MEFTConfig.scales`) stands for.
EXACT_DEFAULT_K = 4
#: The scales (k of 2^-k) the starting-point measurement tries, fewest stored bits first.
SCALE_BITS_SEARCH = tuple(range(2, 13))
#: `MEFTConfig.start_tolerance=None`: the tolerance per measure of the starting point. KL 0.01 nats: on SmolLM2-135M
#: (30 layers) MEFT3 at k = 5 measures 0.015 and keeps 95.0-96.3 % of the original's top-1 next tokens on prose,
#: depending on the adapters' random init; at k = 6 0.005 and 96-97 %; MEFT1 (the default there) at k = 5 0.0092 and
#: 96.2 %. 1 − cosine 0.02: MiniLM's MEFT3 at k = 4 (0.014).
DEFAULT_START_TOLERANCE = {"kl": 0.01, "cosine": 0.02}
#: `MEFTConfig.recompute_chunk_bytes` default: 3 MiB of a position-wise block's widest activation per chunk.
#: Every chunk re-reads the block's weights and runs smaller matrix products, so fewer chunks are faster: on the
#: README's 8-layer LLaMA decoder (batch 2, sequence 512, intermediate 1376) one training step took 1.68 s unchunked,
#: 1.77 / 1.82 / 1.85 / 2.02 s in 2 / 3 / 4 / 6 chunks (one process, alternating, medians of 8). With the
#: `gated_activation` pass (two intermediate-wide tensors kept per token instead of three) 2 chunks of 512 tokens
#: peak at 37.9 MiB against 36.7 MiB for 3 chunks (then the attention recompute is the peak) and 51.3 unchunked.
DEFAULT_RECOMPUTE_CHUNK_BYTES = 3 * 2 ** 20
#: The smallest λ / β accepted (see `MEFTConfig.validate`).
MIN_SCALE_K = 16
MIN_SCALE = 2.0 ** -MIN_SCALE_K


def _integer(name: str, value, lo: int, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer ≥ {lo}"
        raise ValueError(f"MEFTConfig.{name}={value!r} must be {allowed}")


def _number(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ValueError(f"MEFTConfig.{name}={value!r} must be {allowed}")


#: `MEFTConfig.frac_bits` default for `stream_bits=32`: range ±2^15 = ±32768, resolution 2^-16 ≈ 1.5e-5.
INT32_FRAC_BITS = 16


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"MEFTConfig.{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class LayerShape:
    """What method="auto" looks at in a model's layers (`meft_fx.passes.layer_shape` measures it).

    `parallel`: module names of parallel-residual layers (x + attn(x) + ffn(x)); `pre_norm`: every residual
    sub-block leaves its add as it is (no norm after it); `routed_experts`: the FFNs route tokens to experts;
    `gated_ffn`: every layer's FFN is a gated one (`gated_activation` fused it), which runs in slices of its
    intermediate width inside a whole-layer half (`sliced_ffn`).
    """

    parallel: tuple = ()
    pre_norm: bool = False
    routed_experts: bool = False
    gated_ffn: bool = False


def auto_method(shape: LayerShape, numerics: str = "exact") -> tuple[str, str]:
    """(method, why) that method="auto" uses for layers of this shape."""
    if shape.parallel:
        return AUTO_PARALLEL, ("parallel-residual layers (x + attn(x) + ffn(x)) have no separate attention and "
                               "FFN sub-blocks for MEFT3, so the whole layer is F")
    if shape.pre_norm and shape.gated_ffn and not shape.routed_experts and numerics == "exact":
        return AUTO_PRE_NORM, ("pre-norm layers with gated FFNs under exact numerics: MEFT1 scales one stream, so it "
                               "stores k bits per element per layer where MEFT3 stores 2k, and its whole-layer F "
                               "runs the FFN in slices (MEFTConfig(method='meft3') for MEFT3)")
    why = ("post-norm layers" if not shape.pre_norm else "float numerics" if numerics != "exact"
           else "routed experts (MEFT3's FFN half runs them in chunks of tokens)" if shape.routed_experts
           else "FFNs without a gate (a whole-layer half would recompute every token's FFN activations at once)")
    return "meft3", f"{why}: MEFT3 (attention and FFN sub-blocks as F and G, adapters on both)"


@dataclass
class MEFTConfig:
    """How `meft_fx.convert` rewrites a model.

    Fields:
        method: "meft1" (F = whole pretrained layer + adapter, G = adapter, streams swap),
            "meft2" (F = adapter, G = whole pretrained layer + adapter, streams swap),
            "meft3" (F = attention sub-block + adapter, G = FFN sub-block + adapter, no swap), or
            "auto" (default): chosen per model (`auto_method`; `explain` says which and why): MEFT1 for
            pre-norm layers with gated FFNs (LLaMA-style decoders) under exact numerics — one scaled
            stream stores k bits per element per layer where MEFT3 stores 2k — and for parallel-residual
            layers (x + attn(x) + mlp(x): GPT-J, GPT-NeoX, Falcon), which have no separate sub-blocks for
            MEFT3's F and G; MEFT3 otherwise: routed experts (Mixtral) and ungated FFNs (GPT-2), whose
            FFN half runs in chunks of tokens, post-norm layers (BERT-style encoders), float numerics.
            The converted model's `meft_config` holds the method used. method="meft3" on a
            parallel-residual model is a ConversionError.
        lam: scale λ on stream 1 (h1_n = λ·h1_{n-1} + F(h2_{n-1})). None = the default for `method`:
            the paper's value with float numerics; with exact numerics 2^-k (or 1 for a stream the method does
            not scale), k = `scale_bits` or, when that is None too, measured at convert time (the fewest stored
            bits that keep the converted model within `start_tolerance` of the original: `meft_fx.starting_point`).
            With exact numerics it must be a power of two 2^-k.
        beta: scale β on stream 2 (h2_n = β·h2_{n-1} + G(h1_n)). None and powers of two: as for `lam`.
        scale_bits: k of λ = β = 2^-k for every stream the method scales (MEFT3 both, MEFT1 λ, MEFT2 β): k bits
            per element per scaled stream per layer are stored. None (default): measured at convert time (see
            `lam`); an integer in [0, 16] fixes it. A `lam` or `beta` given as well takes precedence for its stream.
        start_tolerance: how far the converted model may start from the original: the mean KL divergence (nats)
            of its next-token distribution from the original's for a model with a vocabulary head, else
            1 − the mean cosine similarity of the converted module's output hidden states. Convert measures it
            (`explain` shows it), chooses the scale by it when none is given, and warns when the model is
            further. None (default): 0.01 for the KL, 0.02 for 1 − cosine (`DEFAULT_START_TOLERANCE`).
        adapter_rank: bottleneck width r of every adapter (Linear d→r → act → dropout → Linear r→d).
        adapter_activation: the adapter's non-linearity, one of "relu", "gelu", "tanh", "silu".
        adapter_dropout: dropout probability inside adapters (paper: 0.1).
        adapter_init_std: std of the N(0, std) init of both adapter weights (paper: 0.02; biases are 0).
        numerics: "exact" (default) keeps both streams in int64 fixed point (meft_fx.runtime.fixed_point,
            `frac_bits` fractional bits), computes F and G in the model's dtype on the dequantized stream and adds their
            quantized outputs in integers; λ = 2^-k1, β = 2^-k2 are shifts whose dropped k bits per
            element are stored, so the backward rebuilds every activation bit for bit at any depth
            and dtype (cost: k1 + k2 bits per element per layer, plus an int64 checksum that detects
            a non-deterministic F/G). Defaults per method: MEFT1 λ = 2^-k, β = 1; MEFT2 λ = 1,
            β = 2^-k; MEFT3 λ = β = 2^-k, with k = EXACT_DEFAULT_K.
            "float" is the paper's arithmetic (λ = β = 0.1 by default, division by λ, β in the
            backward), kept for comparison: rounding error grows ~1/λ per layer (fine for shallow
            fp32 stacks; at 24 layers, or in bf16, the reversible gradients are wrong).
        frac_bits: fractional bits of the exact fixed-point streams (default 32 for int64 streams: resolution
            2^-32, range ±2^31; INT32_FRAC_BITS = 16 for int32 streams: range ±2^15). A model whose activations
            overflow that range (an error says so) needs fewer, e.g. 24 (range ±2^39, resolution 6e-8). Ignored by
            float numerics.
        stream_bits: the exact streams' integer width, 64 or 32; None (default): chosen by convert
            (`meft_fx.stream_width`): int32 for a bf16/fp16 model whose hidden states, measured on the starting
            point's probe, fit int32 with 4× headroom at ≥ 12 fractional bits (frac_bits then chosen by that
            range, at most 16), else int64 (float32/float64 models: int64). 32 halves the two top streams' memory
            (2 × 32 instead of 2 × 64 bits per element of the hidden state) when their range fits ±2^(31 −
            frac_bits): SmolLM2-135M's hidden state reaches |x| = 24448 on its probe in bf16, so int32 with 14
            fractional bits. Gradients stay bit-identical; a stream that leaves the range raises
            FixedPointOverflow naming frac_bits and stream_bits=64.
        reversible: True runs the backward by reconstructing activations (caches ~nothing).
            False builds the very same network and trains it with ordinary autograd: the reference.
        leak_compensation: True (default) writes each pretrained half as F'(x) = F(x) − λ·x (its skip connection
            keeps 1 − λ of its input; likewise G' = G − β·y): a coupling then adds λ times the two streams'
            difference to the pretrained chain, not λ times a whole stream, which keeps a deep pre-norm decoder at
            its pretrained output (perplexity ×1350 without it on SmolLM2-135M at λ = β = 2^-4; see
            docs/numerics.md). Exact in both arithmetics; adapters standing alone are never compensated.
            False: the paper's couplings, y1 = λ·x1 + F(x2).
        output: which stream leaves the stack. "pretrained" (default) is the stream last written by the
            pretrained blocks, which preserves the pretrained model's output at initialisation;
            "mean" averages both streams as the paper's BERT code did.
        train_head: also train parameters outside the transformer's base model (a task head such as a
            classifier) when the model has a separate `base_model` — those the caller left trainable: a
            head whose parameters were frozen (requires_grad=False) stays frozen. Everything pretrained
            and the output embeddings stay frozen: a causal LM's head is its output embedding (often tied to
            the input embeddings), so train_head trains nothing there; `modules_to_save=("lm_head",)` does.
        modules_to_save: names of modules to train in full and save with the adapters, as PEFT's
            `modules_to_save` (e.g. ("lm_head",) for a causal LM's head, ("score",), ("model.norm",)): a
            module path, or a name that ends one path (ValueError when none or several match). A weight
            it shares with another module (a head tied to the input embeddings) is untied first: the
            module trains its own copy, the other keeps the pretrained tensor.
        chunk_loss: in training, compute a vocabulary head's cross-entropy in chunks of tokens, so that the
            full logits (tokens × vocabulary) never exist: the `chunk_head_loss` pass rewrites a linear map
            with ≥ 1024 outputs that feeds only a cross-entropy (and the returned logits). Same loss and
            gradients; in training calls with labels `outputs.logits` is then None (eval and no_grad
            calls return the logits as before). False keeps the model's own head and loss.
        loss_chunk_bytes: bytes of logits per chunk (default 4 MiB: 32 tokens of a 32000-word
            vocabulary in fp32); rows per chunk = loss_chunk_bytes / (vocabulary · itemsize).
        recompute_chunk_bytes: position-wise halves (the FFN sub-block and its adapter under MEFT3, when
            it reads nothing but the stream, per-feature values such as a norm's weight and values made from
            weights alone) run over the tokens in chunks whose widest activation (the FFN's intermediate; a
            mixture of experts': top-k × its experts' intermediate) takes at most this many bytes — in the
            forward, the backward's recompute and the reference alike — so the backward's working set is
            bounded (default 3 MiB; 0: never chunk). More chunks are slower (every chunk re-reads the
            weights), so a half with routed experts keeps at least `meft_fx.runtime.chunks.MIN_EXPERT_ROWS`
            rows per expert in a chunk whatever the budget (measured in the README's Mixtral table). Dropout
            masks inside such a block are drawn chunk by chunk (same distribution).
        capture: "export" (torch.export, non-strict, dynamic batch/sequence), "fx"
            (torch.fx.symbolic_trace, for plain modules), or "auto" (export, falling back to fx).
        inplace: False (default) converts a deep copy and leaves the caller's model untouched;
            True rewrites the given model object itself (saves the memory of a copy).
        verbose: progress lines (capture, analysis, rewrite; a re-capture for a new call structure
            mid-training) on stderr. None (default): shown once the work has taken 2 s (then the lines
            so far too), so quick conversions stay silent; True: always; False: never.
    """

    method: str = AUTO
    lam: Optional[float] = None
    beta: Optional[float] = None
    scale_bits: Optional[int] = None
    start_tolerance: Optional[float] = None
    adapter_rank: int = 8
    adapter_activation: str = "relu"
    adapter_dropout: float = 0.1
    adapter_init_std: float = 0.02
    numerics: str = "exact"
    frac_bits: Optional[int] = None
    stream_bits: Optional[int] = None
    reversible: bool = True
    leak_compensation: bool = True
    output: str = "pretrained"
    train_head: bool = True
    modules_to_save: tuple = ()
    chunk_loss: bool = True
    loss_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    recompute_chunk_bytes: int = DEFAULT_RECOMPUTE_CHUNK_BYTES
    capture: str = "auto"
    inplace: bool = False
    verbose: Optional[bool] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "MEFTConfig":
        """Check every field (also after the config was changed in place); returns the config.

        Raises ValueError naming the field, its value and what is allowed.
        """
        _choice("method", self.method, (AUTO, *METHODS))
        _choice("numerics", self.numerics, NUMERICS)
        _choice("capture", self.capture, CAPTURES)
        _choice("output", self.output, OUTPUTS)
        _choice("adapter_activation", self.adapter_activation, ACTIVATIONS)
        for name in ("lam", "beta"):
            self._check_scale(name)
        if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"MEFTConfig.modules_to_save={self.modules_to_save!r} must be a tuple or list of module "
                             f"names, e.g. ('lm_head',)")
        self.modules_to_save = tuple(self.modules_to_save)
        if self.scale_bits is not None:
            _integer("scale_bits", self.scale_bits, 0, MIN_SCALE_K)
        if self.start_tolerance is not None:
            _number("start_tolerance", self.start_tolerance, "a number > 0 (or None: the default per measure)",
                    lambda v: 0.0 < v < math.inf)
        _integer("adapter_rank", self.adapter_rank, 1, None)
        if self.stream_bits is not None:
            _choice("stream_bits", self.stream_bits, tuple(STREAM_DTYPES) + (None,))
            if self.frac_bits is None:
                self.frac_bits = DEFAULT_FRAC_BITS if self.stream_bits == 64 else INT32_FRAC_BITS
        if self.frac_bits is not None:
            _integer("frac_bits", self.frac_bits, 8, min(MAX_FRAC_BITS, (self.stream_bits or 64) - 2))
        _integer("loss_chunk_bytes", self.loss_chunk_bytes, 1, None)
        _integer("recompute_chunk_bytes", self.recompute_chunk_bytes, 0, None)
        _number("adapter_dropout", self.adapter_dropout, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _number("adapter_init_std", self.adapter_init_std, "a finite number > 0", lambda v: 0.0 < v < math.inf)
        for name in ("reversible", "leak_compensation", "train_head", "chunk_loss", "inplace", "verbose"):
            if not isinstance(getattr(self, name), bool) and not (name == "verbose" and self.verbose is None):
                raise ValueError(f"MEFTConfig.{name}={getattr(self, name)!r} must be True or False"
                                 + (" (or None: shown after 2 s)" if name == "verbose" else ""))
        return self

    @property
    def streams(self) -> tuple[int, int]:
        """(stream_bits, frac_bits) a stack is built with before convert chooses (`stream_bits=None`: int64 until
        `meft_fx.stream_width` measured the model)."""
        bits = self.stream_bits or 64
        return bits, self.frac_bits if self.frac_bits is not None else (
            DEFAULT_FRAC_BITS if bits == 64 else INT32_FRAC_BITS)

    @property
    def chooses_streams(self) -> bool:
        """Does convert choose the stream width (exact numerics, `stream_bits=None`)?"""
        return self.numerics == "exact" and self.stream_bits is None

    def _check_scale(self, name: str) -> None:
        v = getattr(self, name)
        if v is None:
            return
        _number(name, v, "a number in (0, 1] (or None for the method's default)", lambda x: 0.0 < x <= 1.0)
        if v < MIN_SCALE:
            raise ValueError(f"MEFTConfig.{name}={v!r} is below {MIN_SCALE:g} (2^-{MIN_SCALE_K}): the float inverse "
                             f"would divide by more than 2^{MIN_SCALE_K} per layer (non-finite gradients) and exact "
                             f"numerics would store more than {MIN_SCALE_K} bits per element per layer; the paper "
                             f"uses 0.1, exact numerics default to 2^-{EXACT_DEFAULT_K}")
        if ARITHMETICS[self.numerics].powers_of_two:
            try:
                exponent_of(v, f"MEFTConfig.{name}")
            except ValueError as e:
                raise ValueError(f"{e}; numerics={self.numerics!r} needs {name} = 2^-k "
                                 f"(or use numerics='float' for any value)") from None

    @property
    def spec(self) -> MethodSpec:
        """The row of the method table for `method` (ValueError for "auto": `resolved` chooses it)."""
        if self.method == AUTO:
            raise ValueError("MEFTConfig.method='auto' is chosen per model by convert (MEFT1 for parallel-residual "
                             "layers and for pre-norm layers with gated FFNs under exact numerics, else MEFT3: "
                             "meft_fx.config.auto_method); the converted model's meft_config holds the method used. "
                             "Set method='meft1'|'meft2'|'meft3' to ask for one")
        return METHODS[self.method]

    def resolved(self, shape: LayerShape = LayerShape()) -> "MEFTConfig":
        """This config with method "auto" replaced by `auto_method`'s choice for layers of this shape.

        ConversionError when method="meft3" was asked for and there are some.
        """
        parallel_layers = list(shape.parallel)
        if parallel_layers and self.method == "meft3":
            from .errors import ConversionError

            raise ConversionError(
                f"method='meft3' needs separate attention and FFN sub-blocks (x = x + attn(x), then x = x + ffn(x)), "
                f"but {', '.join(parallel_layers[:3])}{' ...' if len(parallel_layers) > 3 else ''} "
                f"{'is a parallel-residual layer' if len(parallel_layers) == 1 else 'are parallel-residual layers'} "
                f"(x + attn(x) + ffn(x)): both branches read the layer's input, while MEFT3's G reads F's output, so "
                f"splitting them would change what the pretrained layer computes. Use method='meft1' or 'meft2' (the "
                f"whole layer as F or G), or method='auto'")
        if self.method != AUTO:
            return self
        return replace(self, method=auto_method(shape, self.numerics)[0])

    def method_reason(self, shape: LayerShape = LayerShape()) -> str:
        """Why `resolved(shape)` has its method (shown by `explain`)."""
        if self.method != AUTO:
            return f"asked for (MEFTConfig.method={self.method!r})"
        return "method='auto': " + auto_method(shape, self.numerics)[1]

    @property
    def scales(self) -> tuple[float, float, bool]:
        """(λ, β, swap) actually used: the given λ/β, or the method's defaults for the numerics."""
        spec = self.spec
        pow2 = ARITHMETICS[self.numerics].powers_of_two
        if self.scale_bits is not None:
            lam, beta = spec.exact_scales(self.scale_bits)
        else:
            lam, beta = spec.exact_scales(EXACT_DEFAULT_K) if pow2 else (spec.lam, spec.beta)
        return (float(self.lam) if self.lam is not None else lam,
                float(self.beta) if self.beta is not None else beta, spec.swap)

    def tolerance(self, metric: str) -> float:
        """The start tolerance for `metric` ("kl" or "cosine"): `start_tolerance`, or the default for the metric."""
        return float(self.start_tolerance) if self.start_tolerance is not None else DEFAULT_START_TOLERANCE[metric]

    @property
    def measures_scale(self) -> bool:
        """True when convert chooses the scale by measuring the starting point (exact numerics, no λ/β/k given)."""
        return ARITHMETICS[self.numerics].powers_of_two and self.lam is None and self.beta is None \
            and self.scale_bits is None

    @property
    def exponents(self) -> Optional[tuple[int, int]]:
        """(k1, k2) with λ = 2^-k1, β = 2^-k2 (k = 0: scale 1); None when a scale is not a power of two
        (possible with float numerics only)."""
        lam, beta, _ = self.scales
        try:
            return exponent_of(lam, "lam"), exponent_of(beta, "beta")
        except ValueError:
            return None

    def to_dict(self) -> dict:
        """The fields as a plain, JSON-ready dict (tuples as lists; for saving next to adapter weights)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}
