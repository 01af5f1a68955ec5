"""Compiled vs eager converted model: step time and activation memory.

    python examples/compile_benchmark.py --archs bert,llama --layers 4 --hidden 256 --seq 96 --batch 8
    python examples/compile_benchmark.py --bare --baseline --dropout 0      # the compiled-speed bar

For each architecture (random init, fp32, labels given; dropout 0.1 unless --dropout) one converted
model (`meft_fx.convert`, the default config, `--numerics` exact by default) is copied: one copy runs
eagerly, the other through `meft_fx.compile` (`--bare`: a plain `torch.compile(model)`). With
--baseline the unconverted model runs eagerly and under `torch.compile` too, so the converted
model's compiled/eager ratio can be set against the unconverted one's (the bar: converted ratio ≤
max(1, unconverted ratio)). After warm-up steps (compilation), the timed steps of all runners
alternate, so they see the same load on a shared machine; the time is the median step (forward +
loss + backward, gradients zeroed in place), min–max in the table; a ratio is the median of the rounds'
ratios (each round runs every runner once), their range in parentheses. Memory:
`meft_fx.memory.measure_step_memory` of one step. With --check, the compiled gradients are also
compared with eager's (same seed, same masks).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import meft_fx
from meft_fx.memory import MiB, alternating_times, measure_step_memory, paired_ratio


def build(arch: str, layers: int, hidden: int, seq: int, batch: int, seed: int = 0, dropout: float = 0.1):
    """(model, batch dict) for 'bert' (sequence classification) or 'llama' (causal LM), dropout `dropout`."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    if arch == "bert":
        from transformers import BertForSequenceClassification

        from meft_fx.bench.run import bert_config
        cfg = bert_config(hidden, layers, max_seq=seq)
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
        model = BertForSequenceClassification(cfg)
        labels = torch.randint(0, cfg.num_labels, (batch,), generator=g)
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = max(1, hidden // 64)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                          max_position_embeddings=max(512, seq), attention_dropout=dropout, use_cache=False)
        model = LlamaForCausalLM(cfg)
        labels = None
    else:
        raise ValueError(f"unknown arch {arch!r}: bert or llama")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long),
              "labels": ids.clone() if labels is None else labels}
    return model.train(), inputs


def _grads(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**inputs).loss.backward()
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()  # torch.compile's wrapper
            if p.grad is not None}


def _runners(model, inputs, numerics, same_masks_as_eager, outer, bare, baseline) -> dict:
    """{name: model}: the converted model eager and compiled (and the unconverted one both ways)."""
    base = copy.deepcopy(model) if baseline else None
    eager = meft_fx.convert(model, meft_fx.MEFTConfig(numerics=numerics), example_inputs=dict(inputs))
    compiled = copy.deepcopy(eager)
    if bare:
        compiled = torch.compile(compiled)
    else:
        meft_fx.compile(compiled, same_masks_as_eager=same_masks_as_eager, outer=outer)
    runners = {"eager": eager, "compiled": compiled}
    if baseline:
        runners.update(base_eager=base, base_compiled=torch.compile(copy.deepcopy(base)))
    return runners


def measure(arch: str, layers: int, hidden: int, seq: int, batch: int, repeats: int, warmup: int,
            check: bool, numerics: str = "exact", same_masks_as_eager: bool = True, outer: bool = True,
            bare: bool = False, baseline: bool = False, dropout: float = 0.1) -> dict:
    model, inputs = build(arch, layers, hidden, seq, batch, dropout=dropout)
    t0 = time.perf_counter()
    runners = _runners(model, inputs, numerics, same_masks_as_eager, outer, bare, baseline)
    row: dict = {"arch": arch, "numerics": numerics, "same_masks_as_eager": same_masks_as_eager, "outer": outer,
                 "bare": bare, "dropout": dropout, "layers": layers, "hidden": hidden, "seq": seq, "batch": batch}
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in runners.items()}

    def step(k):
        for p in params[k]:
            if p.grad is not None:
                p.grad.zero_()
        runners[k](**inputs).loss.backward()

    for k in runners:  # warm-up (the first compiled steps compile)
        t = time.perf_counter()
        for _ in range(warmup):
            step(k)
        row[f"{k}_warmup_s"] = time.perf_counter() - t
    row["compile_s"] = row["compiled_warmup_s"]
    if check:
        ge, gc = _grads(runners["eager"], inputs), _grads(runners["compiled"], inputs)
        row["max_rel_err"] = max(((gc[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-12)).item() for n in ge)
    for k in runners:
        torch.manual_seed(0)
        mem = measure_step_memory(lambda: step(k))
        row[f"{k}_activation_mib"], row[f"{k}_peak_mib"] = mem.activation_bytes / MiB, mem.peak_bytes / MiB
    times = alternating_times({k: (lambda k=k: step(k)) for k in runners}, rounds=repeats, warmup=0)
    for k, ts in times.items():
        row[f"{k}_step_s"], row[f"{k}_step_range"] = statistics.median(ts), (min(ts), max(ts))
    row["time_ratio"], *row["time_ratio_range"] = paired_ratio(times["compiled"], times["eager"])
    row["activation_ratio"] = row["compiled_activation_mib"] / max(row["eager_activation_mib"], 1e-9)
    if baseline:
        row["base_time_ratio"], *row["base_time_ratio_range"] = paired_ratio(times["base_compiled"], times["base_eager"])
        row["bar"] = max(1.0, row["base_time_ratio"])
    row["total_s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    return row


def _timed(row: dict, k: str) -> str:
    lo, hi = row[f"{k}_step_range"]
    return f"{row[f'{k}_step_s']:.3f} ({lo:.3f}–{hi:.3f})"


def _ratio(row: dict, key: str) -> str:
    lo, hi = row[f"{key}_range"]
    return f"{row[key]:.2f} ({lo:.2f}–{hi:.2f})"


def format_rows(rows: list[dict]) -> str:
    out = ["| model | eager s/step | compiled s/step | time × eager | unconverted: compiled × eager | eager act. MiB "
           "| compiled act. MiB | act. × eager | compile s | max rel grad err |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "—"
        base = _ratio(r, "base_time_ratio") if "base_time_ratio" in r else "—"
        what = f"{r['numerics']}" + (", torch.compile" if r.get("bare") else "") + \
            ("" if r.get("outer", True) else ", couplings only") + f", dropout {r.get('dropout', 0.1):g}"
        out.append(f"| {r['arch']} ({what}) L{r['layers']} h{r['hidden']} s{r['seq']} b{r['batch']} | "
                   f"{_timed(r, 'eager')} | {_timed(r, 'compiled')} | {_ratio(r, 'time_ratio')} | {base} | "
                   f"{r['eager_activation_mib']:.1f} | {r['compiled_activation_mib']:.1f} | {r['activation_ratio']:.2f} "
                   f"| {r['compile_s']:.0f} | {err} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="bert,llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--numerics", default="exact", help="MEFTConfig.numerics of the converted model (default: exact, the default)")
    p.add_argument("--inductor-rng", action="store_true",
                   help="meft_fx.compile(same_masks_as_eager=False): inductor's fused random numbers")
    p.add_argument("--check", action="store_true", help="also compare compiled and eager gradients")
    p.add_argument("--couplings-only", action="store_true",
                   help="meft_fx.compile(outer=False): compile the couplings' F/G, leave the rest eager")
    p.add_argument("--bare", action="store_true", help="a plain torch.compile(converted) instead of meft_fx.compile")
    p.add_argument("--baseline", action="store_true", help="also time the unconverted model, eager and torch.compile")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probabilities of the model (default 0.1)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for arch in args.archs.split(","):
        rows.append(measure(arch.strip(), args.layers, args.hidden, args.seq, args.batch, args.repeats,
                            args.warmup, args.check, args.numerics,
                            not args.inductor_rng, not args.couplings_only, args.bare, args.baseline, args.dropout))
        print(rows[-1], flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
