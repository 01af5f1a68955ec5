"""Generation speed: a converted decoder with its KV cache against the unconverted model with its own.

    python -m meft_fx.bench --generate --arch llama --hidden 512 --intermediate 1376 --heads 8 \\
        --kv-heads 4 --vocab 32000 --depths 8

Batch 1, an 8-token prompt, 128 new tokens, greedy (min_new_tokens = max_new_tokens, so every run
makes all of them), one model built under the bench's seed and converted with the default config.
The three runs alternate round after round (unconverted, converted with its cache, converted
without) so that a change in the machine's load slows all alike; tokens/s is the median over the
rounds, with the slowest and fastest round.
"""
from __future__ import annotations

import statistics

import torch

from ..memory import alternating_times
from .models import BenchModel

METHODS = ("unconverted_cached", "meft_cached", "meft_uncached")


def measure_generation(spec: BenchModel, depth: int, *, prompt: int = 8, new_tokens: int = 128, rounds: int = 3,
                       dtype=torch.float32, device="cpu", seed: int = 0) -> list[dict]:
    """One row per method: tokens_s (median), tokens_s_min/max, ratio (median tokens/s over the
    unconverted model's with its cache), and the run's settings."""
    import meft_fx

    if not spec.decoder:
        raise ValueError(f"--generate needs a decoder: --arch llama or mixtral (got {spec.arch})")
    config = spec.config(depth, prompt + new_tokens)
    model = spec.build(config, dtype, device, seed).eval()
    model.generation_config.use_cache = True
    rev = meft_fx.convert(model, meft_fx.MEFTConfig(verbose=False)).eval()
    if not rev.generation_config.use_cache:
        raise RuntimeError("the converted model cannot generate with a KV cache: " + str(meft_fx.explain(rev, False)))
    ids = torch.randint(0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(seed + 2)).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    runs = {"unconverted_cached": lambda: model.generate(ids, use_cache=True, **kw),
            "meft_cached": lambda: rev.generate(ids, **kw),
            "meft_uncached": lambda: rev.generate(ids, use_cache=False, **kw)}
    with torch.no_grad():
        times = alternating_times(runs, rounds=rounds)
    rate = {m: [new_tokens / t for t in ts] for m, ts in times.items()}
    base = statistics.median(rate["unconverted_cached"])
    return [{"method": m, "depth": depth, "prompt": prompt, "new_tokens": new_tokens, "rounds": rounds,
             "tokens_s": statistics.median(r), "tokens_s_min": min(r), "tokens_s_max": max(r),
             "ratio": statistics.median(r) / base} for m, r in rate.items()]


def format_generation(rows: list[dict], title: str) -> str:
    """Markdown: one line per method, tokens/s and the ratio to the unconverted model with its cache."""
    r0 = rows[0]
    lines = [f"# meft_fx.bench: generation, {title}, {r0['depth']} layers", "",
             f"Batch 1, {r0['prompt']}-token prompt, {r0['new_tokens']} new tokens, greedy; median of "
             f"{r0['rounds']} alternating rounds (slowest–fastest).", "",
             "| method | tokens/s | range | × unconverted (cached) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tokens_s']:.1f} | {r['tokens_s_min']:.1f}–{r['tokens_s_max']:.1f} "
                     f"| {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"
