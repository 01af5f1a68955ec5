"""Compiled vs eager converted model: step time and activation memory (issue 6's measurement).

    python examples/compile_benchmark.py --archs bert,llama --layers 4 --hidden 256 --seq 96 --batch 8

For each architecture (random init, fp32, dropout on, labels given) one converted model
(`meft_fx.convert`, MEFT3, `--numerics` exact by default, as `MEFTConfig`) is copied: one copy runs eagerly, the other through
`meft_fx.compile`. After warm-up steps (compilation), the timed steps of the two alternate, so
both see the same load on a shared machine; the time is the median step (forward + loss + backward,
gradients zeroed in place). Memory: `meft_fx.memory.measure_step_memory` of one step.
With --check, the compiled gradients are also compared with eager's (same seed, same masks).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import meft_fx
from meft_fx.memory import MiB, measure_step_memory


def build(arch: str, layers: int, hidden: int, seq: int, batch: int, seed: int = 0):
    """(model, batch dict) for 'bert' (sequence classification) or 'llama' (causal LM)."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    if arch == "bert":
        from transformers import BertForSequenceClassification

        from meft_fx.bench.run import bert_config
        cfg = bert_config(hidden, layers, max_seq=seq)
        model = BertForSequenceClassification(cfg)
        labels = torch.randint(0, cfg.num_labels, (batch,), generator=g)
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = max(1, hidden // 64)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                          max_position_embeddings=max(512, seq), attention_dropout=0.1, use_cache=False)
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
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def measure(arch: str, layers: int, hidden: int, seq: int, batch: int, repeats: int, warmup: int,
            check: bool, numerics: str = "exact", same_masks_as_eager: bool = True, outer: bool = True) -> dict:
    model, inputs = build(arch, layers, hidden, seq, batch)
    eager = meft_fx.convert(model, meft_fx.MEFTConfig(numerics=numerics), example_inputs=dict(inputs))
    compiled = copy.deepcopy(eager)
    t0 = time.perf_counter()
    meft_fx.compile(compiled, same_masks_as_eager=same_masks_as_eager, outer=outer)
    runners = {"eager": eager, "compiled": compiled}
    row: dict = {"arch": arch, "numerics": numerics, "same_masks_as_eager": same_masks_as_eager, "outer": outer, "layers": layers, "hidden": hidden, "seq": seq, "batch": batch}
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
        ge, gc = _grads(eager, inputs), _grads(compiled, inputs)
        row["max_rel_err"] = max(((gc[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-12)).item() for n in ge)
    for k in runners:
        torch.manual_seed(0)
        mem = measure_step_memory(lambda: step(k))
        row[f"{k}_activation_mib"], row[f"{k}_peak_mib"] = mem.activation_bytes / MiB, mem.peak_bytes / MiB
    times: dict = {k: [] for k in runners}
    for _ in range(repeats):
        for k in runners:  # alternate, so both see the same machine load
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    for k in runners:
        row[f"{k}_step_s"] = statistics.median(times[k])
    row["time_ratio"] = row["compiled_step_s"] / row["eager_step_s"]
    row["activation_ratio"] = row["compiled_activation_mib"] / max(row["eager_activation_mib"], 1e-9)
    row["total_s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    return row


def format_rows(rows: list[dict]) -> str:
    out = ["| model | eager s/step | compiled s/step | time × eager | eager act. MiB | compiled act. MiB "
           "| act. × eager | compile s | max rel grad err |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "—"
        what = f"{r['numerics']}" + ("" if r.get("outer", True) else ", couplings only")
        out.append(f"| {r['arch']} ({what}) L{r['layers']} h{r['hidden']} s{r['seq']} b{r['batch']} | {r['eager_step_s']:.3f} "
                   f"| {r['compiled_step_s']:.3f} | {r['time_ratio']:.2f} | {r['eager_activation_mib']:.1f} "
                   f"| {r['compiled_activation_mib']:.1f} | {r['activation_ratio']:.2f} | {r['compile_s']:.0f} | {err} |")
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for arch in args.archs.split(","):
        rows.append(measure(arch.strip(), args.layers, args.hidden, args.seq, args.batch, args.repeats,
                            args.warmup, args.check, args.numerics,
                            not args.inductor_rng, not args.couplings_only))
        print(rows[-1], flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
