"""The starting point: how far a converted model's output is from the original's, and the scale chosen by it.

MEFT works only if the converted model starts where the pretrained one is (the paper's central finding). Every
coupling leaks λ (or β) of a stream into the pretrained chain — far less with leak compensation, but never nothing —
so the scale is a trade between that distance and the k stored bits per element per scaled stream per layer. On a
30-layer pre-norm decoder (SmolLM2-135M) k = 4 keeps 92 % of the original's top-1 next tokens, k = 5 95-96 % and
k = 6 96-97 %; on a 6-layer post-norm encoder (MiniLM) k = 4 is plenty. So `convert` measures it on the model being converted:

* **the probe** — the example inputs the caller gave; else, for a transformers causal LM, 4 sequences of 64 tokens
  the original model samples itself from its BOS token (seeded, the global RNG untouched: text of the model's own
  distribution, which a model's dummy inputs — a few arbitrary ids — are not); else the model's dummy inputs;
* **the distance** — with a vocabulary head (the model's output embeddings read the converted module's output):
  the mean KL divergence (nats) of the converted model's next-token distribution from the original's, over the
  probe's (unpadded) tokens; otherwise 1 − the mean cosine similarity of the converted module's output vectors to
  the original's. Both in eval mode (no dropout), in the model's dtype;
* **the floor** — the distance at the finest scale tried, 2^-12: what the scale does not cause (the adapters'
  random init, the dtype's rounding; in bf16 it is most of the distance);
* **the choice** — with exact numerics and no scale given (`MEFTConfig.measures_scale`), k = 2, 3, ... (fewest
  stored bits first) until the scale adds at most `MEFTConfig.start_tolerance` to the floor (default: KL 0.01 nats,
  or 1 − cosine 0.02); a scale given by hand, or float numerics' λ = β = 0.1, is measured once. When the scale adds
  more, or the floor itself exceeds the tolerance, `convert` warns with the distances and what to change.

The result is a `StartingPoint` on each converted module (`ConvertedModule.starting_point`), shown by `explain`.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .capture import module_mode
from .config import SCALE_BITS_SEARCH, MEFTConfig
from .runtime import stacks_in
from .stream_width import choose_streams, measured_reach

__all__ = ["StartingPoint", "StartWarning", "sample_probe", "choose_scale", "measure", "set_scale_bits",
           "PROBE_SEQUENCES", "PROBE_TOKENS"]

#: The sampled probe of a causal LM: this many sequences of this many tokens.
PROBE_SEQUENCES, PROBE_TOKENS = 4, 64
#: Rows of the vocabulary head's logits computed at once (bounds the memory of the KL).
_KL_ROWS = 64


class StartWarning(UserWarning):
    """A converted model starts further from the original than `MEFTConfig.start_tolerance`."""


@dataclass
class StartingPoint:
    """How far one converted module starts from the original (see the module docstring).

    `metric`: "kl" (nats, next-token distributions) or "cosine" (1 − mean cosine of output vectors); `distance`
    at the scale in use; `floor`: at the finest scale tried (2^-SCALE_BITS_SEARCH[-1]: what the scale does not
    cause — the adapters' random init, the dtype's rounding); `tried`: {k: distance} of every scale measured; `scale_bits`: the k in use (None when the
    scales are not powers of two); `chosen`: "measured" (k chosen by the distance) or "given" (by the config);
    `agreement`: the share of probe tokens whose top-1 next token is the original's (KL metric only);
    `stored_bits`: bits per element per layer the scales store (k1 + k2).
    """

    metric: str
    distance: float
    tolerance: float
    probe: str
    chosen: str
    scale_bits: int | None = None
    stored_bits: int | None = None
    agreement: float | None = None
    floor: float = 0.0
    tried: dict = field(default_factory=dict)

    @property
    def within(self) -> bool:
        """Does the scale add at most the tolerance to the floor, and is the floor itself within it?"""
        return self.distance - self.floor <= self.tolerance and self.floor <= self.tolerance

    def __str__(self) -> str:
        what = "KL of next-token distributions" if self.metric == "kl" else "1 − cosine of output vectors"
        agree = f", top-1 agreement {100 * self.agreement:.1f}%" if self.agreement is not None else ""
        scale = f"λ/β = 2^-{self.scale_bits} ({self.chosen}), " if self.scale_bits is not None else ""
        bits = f"{self.stored_bits} bits stored per element per layer; " if self.stored_bits is not None else ""
        tried = ", ".join(f"k={k}: {d:.4f}" for k, d in self.tried.items()) if len(self.tried) > 1 else ""
        return (f"{scale}{bits}{what} {self.distance:.4f}, {self.floor:.4f} at the finest scale: the scale adds "
                f"{self.distance - self.floor:.4f} (tolerance {self.tolerance:g} for that and for the floor"
                f"{'' if self.within else ', EXCEEDED'}){agree}; on {self.probe}"
                + (f"; tried {tried}" if tried else ""))


# ----------------------------------------------------------------------------------------------- the probe

def sample_probe(model: nn.Module) -> dict | None:
    """{"input_ids": PROBE_SEQUENCES × PROBE_TOKENS tokens, "attention_mask": ones} sampled from a transformers causal LM starting at its
    BOS token (temperature 1, seeded; the global RNG is left as it was); None for other models."""
    cfg = getattr(model, "config", None)
    bos = getattr(cfg, "bos_token_id", None)
    can = getattr(model, "can_generate", None)
    if cfg is None or bos is None or getattr(cfg, "is_encoder_decoder", False) or not callable(can) or not can():
        return None
    device = next(model.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            module_mode(model, False):
        torch.manual_seed(0)
        start = torch.full((PROBE_SEQUENCES, 1), int(bos), dtype=torch.long, device=device)
        longest = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or PROBE_TOKENS
        n = min(PROBE_TOKENS, int(longest)) - 1
        ids = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, min_new_tokens=n, max_new_tokens=n, use_cache=True,
                             pad_token_id=getattr(cfg, "pad_token_id", None) or int(bos))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # a tensor mask, as the capture's example has


# ----------------------------------------------------------------------------------------------- measuring

def _output(out) -> torch.Tensor:
    """The module's main output tensor: `last_hidden_state`, the first element, or the tensor itself."""
    if isinstance(out, dict) and not hasattr(out, "last_hidden_state"):
        out = tuple(out.values())
    for get in (lambda o: o.last_hidden_state, lambda o: o[0], lambda o: o):
        try:
            t = get(out)
        except (AttributeError, KeyError, IndexError, TypeError):
            continue
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"no tensor output in {type(out).__name__}")


def _token_mask(call, h: torch.Tensor):
    """The call's attention mask as a boolean (batch, tokens) mask of `h`'s tokens, or None (all count)."""
    mask = call[1].get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(h.shape[:2]):
        return mask.bool()
    return None


def _head(model: nn.Module, width: int):
    """The model's vocabulary head when it reads vectors of `width` (the converted module's output), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) and head.in_features == width else None


def _kl(head: nn.Module, ref: torch.Tensor, got: torch.Tensor):
    """(mean KL(ref ‖ got) in nats, share of equal argmaxes) of the head's distributions over rows of vectors."""
    total, agree = 0.0, 0
    for i in range(0, ref.shape[0], _KL_ROWS):
        p = torch.log_softmax(head(ref[i:i + _KL_ROWS]).float(), -1)
        q = torch.log_softmax(head(got[i:i + _KL_ROWS]).float(), -1)
        total += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
    return total / max(1, ref.shape[0]), agree / max(1, ref.shape[0])


def measure(model: nn.Module, conv: nn.Module, call, reference: torch.Tensor):
    """(metric, distance, agreement or None) of `conv` (a ConvertedModule of `model`) called as `call` against the
    original module's output `reference`."""
    args, kwargs = call
    with torch.no_grad(), module_mode(conv, False):
        got = _output(conv(*args, **kwargs))
    mask = _token_mask(call, reference)
    ref, got = (reference[mask], got[mask]) if mask is not None else (reference, got)
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    head = _head(model, ref.shape[-1])
    if head is not None:
        with torch.no_grad():
            kl, agree = _kl(head, ref, got)
        return "kl", kl, agree
    cos = torch.nn.functional.cosine_similarity(ref.float(), got.float(), dim=-1)
    return "cosine", float(1.0 - cos.mean()), None


def set_scale_bits(conv: nn.Module, k: int) -> None:
    """Every coupling of `conv` (all its captured call structures) scales its scaled streams by 2^-k, and later
    captures do too (its config's `scale_bits`)."""
    for stack in conv.stacks:
        for c in stack.couplings:
            c.lam = 2.0 ** -k if c.lam != 1.0 else 1.0
            c.beta = 2.0 ** -k if c.beta != 1.0 else 1.0
    conv.config = dataclasses.replace(conv.config, scale_bits=k, lam=None, beta=None)


def _stored_bits(conv: nn.Module) -> int | None:
    """Bits per element per layer the exact arithmetic stores in `conv`'s stack (the most of any coupling)."""
    for stack in stacks_in(conv.graph_module):
        if stack.arithmetic.powers_of_two:
            a = stack.arithmetic
            return max((a.residue_bits(c.lam) + a.residue_bits(c.beta) for c in stack.couplings), default=0)
    return None


def _record_calls(model: nn.Module, convs: list, args, kwargs) -> dict:
    """{converted module: (args, kwargs) of its first call} in one no-grad eval forward of `model`."""
    seen, hooks = {}, []
    for conv in convs:
        def hook(mod, a, k, conv=conv):
            seen.setdefault(conv, (a, k))
        hooks.append(conv.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), torch.random.fork_rng(), module_mode(model, False):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def choose_scale(model: nn.Module, convs: list, config: MEFTConfig, probe, probe_name: str, progress) -> list:
    """Measure (and, when the config leaves the scale open, choose) each converted module's starting point on
    `probe` = (args, kwargs) of the model; warns (`StartWarning`) beyond the tolerance. Returns the StartingPoints,
    also kept as each module's `starting_point`."""
    calls = _record_calls(model, convs, *probe)
    points = []
    for conv in convs:
        if conv not in calls:
            continue
        call = calls[conv]
        if conv.config.chooses_streams:
            choice = choose_streams(conv, measured_reach(conv, call), _float_dtype(conv.original))
            progress(f"{conv.owner or conv.original_class}: streams {choice}")
        with torch.no_grad(), module_mode(conv.original, False):
            reference = _output(conv.original(*call[0], **call[1]))
        point = _search(model, conv, call, reference, config, probe_name, progress)
        conv.starting_point = point
        points.append(point)
        if not point.within:
            warnings.warn(_far_message(conv, point, config), StartWarning, stacklevel=3)
    return points


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of `module`'s first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _search(model, conv, call, reference, config: MEFTConfig, probe_name: str, progress) -> StartingPoint:
    """The StartingPoint of `conv`. The floor first: the distance at the finest scale tried (what the scale does not
    cause: the adapters' random init, the dtype's rounding); then, when the config leaves the scale open, k = 2, 3,
    ... until the scale adds at most the tolerance to the floor; the scales a config gives are measured once."""
    original = conv.config
    search, exps = original.measures_scale, original.exponents
    finest = SCALE_BITS_SEARCH[-1]
    set_scale_bits(conv, finest)
    metric, floor, _ = _measured(model, conv, call, reference, finest, progress)
    tolerance, tried = config.tolerance(metric), {finest: floor}
    given = None if search else (max(exps) if exps else 0)  # the config's scales (0: not powers of two)
    for k in SCALE_BITS_SEARCH if search else [None]:
        if k is None:
            _use_scales_of(conv, original)
        else:
            set_scale_bits(conv, k)
        metric, dist, agree = _measured(model, conv, call, reference, k, progress)
        tried[k if search else given] = dist
        if dist - floor <= tolerance:
            break
    bits = k if search else (given or None)
    return StartingPoint(metric, dist, tolerance, probe_name, "measured" if search else "given", scale_bits=bits,
                         stored_bits=_stored_bits(conv), agreement=agree, floor=floor, tried=dict(sorted(tried.items())))


def _use_scales_of(conv, config: MEFTConfig) -> None:
    """`conv`'s couplings at `config`'s λ/β (after `set_scale_bits` measured the floor), and `config` again."""
    lam, beta, _ = config.scales
    for stack in conv.stacks:
        for c in stack.couplings:
            c.lam, c.beta = (lam if c.lam != 1.0 else 1.0), (beta if c.beta != 1.0 else 1.0)
    conv.config = config


def _measured(model, conv, call, reference, k, progress):
    """`measure` at the scale `conv` has now, with a progress line."""
    metric, dist, agree = measure(model, conv, call, reference)
    progress(f"{conv.owner or conv.original_class}: starting point " + (f"at k={k}: " if k is not None else "")
             + f"{'KL' if metric == 'kl' else '1 − cosine'} {dist:.4f}"
             + (f", top-1 agreement {100 * agree:.1f}%" if agree is not None else ""))
    return metric, dist, agree


def _far_message(conv, point: StartingPoint, config: MEFTConfig) -> str:
    what = conv.owner or conv.original_class
    fixes = []
    if not config.leak_compensation:
        fixes.append("leak_compensation=True")
    if point.floor > point.tolerance:
        fixes.append(f"a smaller adapter_init_std (now {config.adapter_init_std:g}; e.g. 0.002): at the finest scale "
                     f"the distance is still {point.floor:.4f}, so the adapters' random initialisation (or the dtype's "
                     f"rounding) sets it, not the scale — adapters that stand alone (MEFT1's G, MEFT2's F) read the "
                     f"raw residual stream, which in a pre-norm decoder is large")
    if point.distance - point.floor > point.tolerance:
        fixes.append("a smaller scale (MEFTConfig(scale_bits=k) with a larger k, or leave lam/beta/scale_bits None "
                     "so that convert chooses it)")
    if config.numerics == "float":
        fixes.append("numerics='exact' (powers of two, scales chosen by measurement)")
    return (f"meft_fx: {what} starts far from the original model: {point}. A fine-tuning run would begin from a "
            f"damaged model. Try {'; or '.join(fixes)}.")
