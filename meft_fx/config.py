"""`MEFTConfig`: every knob of the conversion, validated when it is built."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

METHODS = ("meft1", "meft2", "meft3")
NUMERICS = ("float", "exact")
CAPTURES = ("auto", "export", "fx")
OUTPUTS = ("pretrained", "mean")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu")

# (lambda, beta, swap streams after each coupling) from Table 1 of the MEFT paper.
PAPER_SCALES = {
    "meft1": (0.1, 1.0, True),
    "meft2": (1.0, 0.1, True),
    "meft3": (0.1, 0.1, False),
}

#: numerics="exact": λ and β are powers of two 2^-k; k when `lam`/`beta` are None, chosen by
#: measurement on all-MiniLM-L6-v2 (starting-point cosine vs bits stored; see the README).
EXACT_DEFAULT_K = 4


def exact_scales(method: str, k: int = EXACT_DEFAULT_K) -> tuple[float, float, bool]:
    """(λ, β, swap) of `method` under exact numerics: the paper's scaled stream(s) get 2^-k, the others 1."""
    lam, beta, swap = PAPER_SCALES[method]
    return (2.0 ** -k if lam != 1.0 else 1.0, 2.0 ** -k if beta != 1.0 else 1.0, swap)


def exponent_of(scale: float, name: str = "scale") -> int:
    """k with scale == 2^-k exactly (k ≥ 0); ValueError naming the nearest powers of two otherwise."""
    s = float(scale)
    if not (0.0 < s <= 1.0) or not math.isfinite(s):
        raise ValueError(f"{name}={scale!r} must be a power of two 2^-k in (0, 1]")
    m, e = math.frexp(s)  # s = m·2^e, m in [0.5, 1)
    if m == 0.5:
        return 1 - e
    hi, lo = -e, 1 - e  # 2^-hi > s > 2^-lo
    raise ValueError(f"{name}={scale!r} is not a power of two; nearest: {2.0 ** -hi:g} ({_pow(hi)}) or "
                     f"{2.0 ** -lo:g} ({_pow(lo)})")


def _pow(k: int) -> str:
    return f"2^-{k}" if k else "2^0"


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"MEFTConfig.{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


@dataclass
class MEFTConfig:
    """How `meft_fx.convert` rewrites a model.

    Fields:
        method: "meft1" (F = whole pretrained layer + adapter, G = adapter, streams swap),
            "meft2" (F = adapter, G = whole pretrained layer + adapter, streams swap) or
            "meft3" (F = attention sub-block + adapter, G = FFN sub-block + adapter, no swap).
        lam: scale λ on stream 1 (h1_n = λ·h1_{n-1} + F(h2_{n-1})). None = the default for `method`:
            the paper's value with float numerics, 2^-EXACT_DEFAULT_K (or 1) with exact numerics.
            With exact numerics it must be a power of two 2^-k.
        beta: scale β on stream 2 (h2_n = β·h2_{n-1} + G(h1_n)). None and powers of two: as for `lam`.
        adapter_rank: bottleneck width r of every adapter (Linear d→r → act → dropout → Linear r→d).
        adapter_activation: the adapter's non-linearity, one of "relu", "gelu", "tanh", "silu".
        adapter_dropout: dropout probability inside adapters (paper: 0.1).
        adapter_init_std: std of the N(0, std) init of both adapter weights (paper: 0.02; biases are 0).
        numerics: "exact" (default) keeps both streams in int64 fixed point (meft_fx.fixed_point: 32 fractional
            bits), computes F and G in the model's dtype on the dequantized stream and adds their
            quantized outputs in integers; λ = 2^-k1, β = 2^-k2 are shifts whose dropped k bits per
            element are stored, so the backward rebuilds every activation bit for bit at any depth
            and dtype (cost: k1 + k2 bits per element per layer, plus an int64 checksum that detects
            a non-deterministic F/G). Defaults per method: MEFT1 λ = 2^-k, β = 1; MEFT2 λ = 1,
            β = 2^-k; MEFT3 λ = β = 2^-k, with k = EXACT_DEFAULT_K.
            "float" is the paper's arithmetic (λ = β = 0.1 by default, division by λ, β in the
            backward), kept for comparison: rounding error grows ~1/λ per layer (fine for shallow
            fp32 stacks; at 24 layers, or in bf16, the reversible gradients are wrong).
        reversible: True runs the backward by reconstructing activations (caches ~nothing).
            False builds the very same network and trains it with ordinary autograd: the reference.
        output: which stream leaves the stack. "pretrained" (default) is the stream last written by the
            pretrained blocks, which preserves the pretrained model's output at initialisation;
            "mean" averages both streams as the paper's BERT code did.
        train_head: also train parameters outside the transformer's base model (a task head such as a
            classifier) when the model has a separate `base_model`; everything pretrained stays frozen.
        capture: "export" (torch.export, non-strict, dynamic batch/sequence), "fx"
            (torch.fx.symbolic_trace, for plain modules), or "auto" (export, falling back to fx).
        inplace: False (default) converts a deep copy and leaves the caller's model untouched;
            True rewrites the given model object itself (saves the memory of a copy).
        verbose: print progress (capture, analysis, rewrite) to stderr.
    """

    method: str = "meft3"
    lam: Optional[float] = None
    beta: Optional[float] = None
    adapter_rank: int = 8
    adapter_activation: str = "relu"
    adapter_dropout: float = 0.1
    adapter_init_std: float = 0.02
    numerics: str = "exact"
    reversible: bool = True
    output: str = "pretrained"
    train_head: bool = True
    capture: str = "auto"
    inplace: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("numerics", self.numerics, NUMERICS)
        _choice("capture", self.capture, CAPTURES)
        _choice("output", self.output, OUTPUTS)
        _choice("adapter_activation", self.adapter_activation, ACTIVATIONS)
        for name in ("lam", "beta"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < float(v) <= 1.0):
                raise ValueError(f"MEFTConfig.{name}={v!r} must be a number in (0, 1] (or None for the paper's value)")
            if self.numerics == "exact":
                try:
                    exponent_of(v, f"MEFTConfig.{name}")
                except ValueError as e:
                    raise ValueError(f"{e}; numerics='exact' needs {name} = 2^-k "
                                     f"(or use numerics='float' for any value)") from None
        if isinstance(self.adapter_rank, bool) or not isinstance(self.adapter_rank, int) or self.adapter_rank < 1:
            raise ValueError(f"MEFTConfig.adapter_rank={self.adapter_rank!r} must be a positive integer")
        if not isinstance(self.adapter_dropout, (int, float)) or not (0.0 <= self.adapter_dropout < 1.0):
            raise ValueError(f"MEFTConfig.adapter_dropout={self.adapter_dropout!r} must be in [0, 1)")
        if not isinstance(self.adapter_init_std, (int, float)) or not self.adapter_init_std > 0:
            raise ValueError(f"MEFTConfig.adapter_init_std={self.adapter_init_std!r} must be > 0")
        for name in ("reversible", "train_head", "inplace", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MEFTConfig.{name}={getattr(self, name)!r} must be True or False")

    @property
    def scales(self) -> tuple[float, float, bool]:
        """(λ, β, swap) actually used: the given λ/β, or the method's defaults for the numerics."""
        lam, beta, swap = PAPER_SCALES[self.method] if self.numerics == "float" else exact_scales(self.method)
        return (float(self.lam) if self.lam is not None else lam,
                float(self.beta) if self.beta is not None else beta, swap)

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
        """The fields as a plain dict (for saving next to adapter weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
