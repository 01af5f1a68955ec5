"""`MEFTConfig`: every knob of the conversion, validated when it is built."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
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
        lam: scale λ on stream 1 (h1_n = λ·h1_{n-1} + F(h2_{n-1})). None = the paper's value for `method`.
        beta: scale β on stream 2 (h2_n = β·h2_{n-1} + G(h1_n)). None = the paper's value for `method`.
        adapter_rank: bottleneck width r of every adapter (Linear d→r → act → dropout → Linear r→d).
        adapter_activation: the adapter's non-linearity, one of "relu", "gelu", "tanh", "silu".
        adapter_dropout: dropout probability inside adapters (paper: 0.1).
        adapter_init_std: std of the N(0, std) init of both adapter weights (paper: 0.02; biases are 0).
        numerics: "float" is the paper's arithmetic (division by λ, β in the backward).
            "exact" (fixed-point streams) is implemented separately; see the README.
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
    numerics: str = "float"
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
        """(λ, β, swap) actually used: the given λ/β, or the paper's values for the method."""
        lam, beta, swap = PAPER_SCALES[self.method]
        return (float(self.lam) if self.lam is not None else lam,
                float(self.beta) if self.beta is not None else beta, swap)

    def to_dict(self) -> dict:
        """The fields as a plain dict (for saving next to adapter weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
