"""Quality beside LoRA at the same budget: fine-tune SmolLM2-135M-Instruct on a real task, held-out accuracy.

    python -m meft_fx.bench --quality [--steps 100] [--batch 8] [--train-size 2000] [--eval-size 300]
                                      [--lrs meft=1e-3,3e-3 lora_qv=3e-4,1e-3 lora_all=3e-4,1e-3] [--out docs/quality]
                                      [--quality-methods meft]   # re-run some methods, keep --out's other rows

Every method (`meft_fx.bench.finetune.METHODS`: meft_fx's default conversion; PEFT LoRA r = 8 on q/v; on all
linear layers) trains a fresh copy of the real model on the same batches in the same order (the movie-review
sentiment task of `meft_fx.bench.tasks`, loss on the answer only) for each of its learning rates, and is scored on
the same held-out reviews; the table keeps each method's best learning rate and lists the others. Step time is the
median over the run (the methods run one after the other, so a change in the machine's load moves them apart:
compare times with `python -m meft_fx.bench --arch smollm2`, which alternates them); activation memory is one
training step on the first batch, for each method as it trains (LoRA without gradient checkpointing here).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from .. import pretrained
from . import finetune, tasks

__all__ = ["DEFAULT_LRS", "run_quality", "format_quality", "parse_lrs", "merge_rows"]

#: Learning rates tried per method (adapters and LoRA both train best far above full fine-tuning's rates).
DEFAULT_LRS = {"meft": (1e-3, 3e-3), "lora_qv": (3e-4, 1e-3), "lora_all": (3e-4, 1e-3)}


def parse_lrs(items) -> dict:
    """{method: (lr, ...)} from strings like "meft=1e-3,3e-3" (ValueError naming a bad item)."""
    out = {}
    for item in items or ():
        method, _, values = item.partition("=")
        if method not in finetune.METHODS or not values:
            raise ValueError(f"--lrs {item!r}: expected METHOD=LR[,LR...] with METHOD one of "
                             f"{', '.join(finetune.METHODS)}")
        try:
            out[method] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--lrs {item!r}: learning rates must be numbers") from None
        if not all(v > 0 for v in out[method]):
            raise ValueError(f"--lrs {item!r}: learning rates must be > 0")
    return out


def run_quality(*, methods=finetune.METHODS, lrs=None, steps: int = 100, batch: int = 8, train_size: int = 2000,
                eval_size: int = 300, seed: int = 0, layers: int | None = None, progress: bool = True) -> list[dict]:
    """One row per (method, learning rate): accuracy (held out), before (the untrained model's), step_s,
    activation_mib, trainable_params, and the settings. `layers`: keep only the first layers (tests)."""
    lrs = {**DEFAULT_LRS, **(lrs or {})}
    base, tok = pretrained.smollm2(layers=layers)
    task = tasks.SentimentChat(tok)
    train_set, held = tasks.split(tasks.rotten_tomatoes(), train_size, eval_size, seed)
    before = task.accuracy(base, held)
    first = task.batch(train_set[:batch])
    rows = []
    for method in methods:
        for lr in lrs[method]:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = finetune.prepare(method, pretrained.smollm2(layers=layers)[0])
            mib = finetune.step_memory(model, first, seed)
            stats = finetune.train(model, task.batch, train_set, steps=steps, batch_size=batch, lr=lr, seed=seed,
                                   desc=f"{method} lr {lr:g}", progress=progress)
            used = getattr(getattr(model, "meft_config", None), "method", None)  # what method="auto" chose
            rows.append({"method": method, "date": time.strftime("%Y-%m-%d"), "meft_method": used, "lr": lr,
                         "accuracy": task.accuracy(model, held), "before": before,
                         "step_s": stats["step_s"], "activation_mib": mib, "final_loss": stats["losses"][-1],
                         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "steps": steps, "batch": batch, "train_size": train_size, "eval_size": eval_size,
                         "layers": layers or 30, "seed": seed, "elapsed_s": time.perf_counter() - t0})
            if progress:
                r = rows[-1]
                print(f"{method} lr {lr:g}: accuracy {100 * r['accuracy']:.1f}%, {r['step_s']:.2f} s/step, "
                      f"{r['activation_mib']:.1f} MiB", file=sys.stderr, flush=True)
            del model
    return rows


NAMES = {"meft": "meft_fx default ({}, exact, k measured)", "lora_qv": "LoRA r=8 on q, v",
         "lora_all": "LoRA r=8 on all linear layers"}


def _name(row: dict) -> str:
    return NAMES.get(row["method"], row["method"]).format((row.get("meft_method") or "MEFT3").upper())


def merge_rows(rows: list[dict], out) -> list[dict]:
    """`rows`, then the rows of other methods in `out`/quality.json (an earlier run), in the order of METHODS."""
    path = os.path.join(out, "quality.json")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        earlier = [r for r in json.load(f) if r["method"] not in {r["method"] for r in rows}]
    order = {m: i for i, m in enumerate(finetune.METHODS)}
    return sorted(rows + earlier, key=lambda r: order.get(r["method"], len(order)))


def format_quality(rows: list[dict]) -> str:
    """Markdown: each method's best learning rate (accuracy, step time, memory), then every run."""
    r0 = rows[0]
    best = {}
    for r in rows:
        if r["method"] not in best or r["accuracy"] > best[r["method"]]["accuracy"]:
            best[r["method"]] = r
    lines = [f"SmolLM2-135M-Instruct ({r0['layers']} layers), Rotten Tomatoes sentiment as chat turns, loss on the "
             f"answer; {r0['steps']} steps of {r0['batch']}, {r0['train_size']} training reviews, {r0['eval_size']} "
             f"held out; untrained: {100 * r0['before']:.1f}%.", "",
             "| method | best lr | held-out accuracy | trainable | step s | activation MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, r in best.items():
        lines.append(f"| {_name(r)} | {r['lr']:g} | {100 * r['accuracy']:.1f}% | {r['trainable_params']:,} | "
                     f"{r['step_s']:.2f} | {r['activation_mib']:.1f} |")
    lines += ["", "Every run: " + "; ".join(f"{r['method']} lr {r['lr']:g}: {100 * r['accuracy']:.1f}%" for r in rows)
              + "."]
    dates = {m: sorted({r.get("date", "an earlier run") for r in rows if r["method"] == m}) for m in best}
    if len({tuple(d) for d in dates.values()}) > 1:
        lines += ["", "Run on: " + "; ".join(f"{m} {', '.join(d)}" for m, d in dates.items()) + "."]
    return "\n".join(lines) + "\n"


def write_quality(rows: list[dict], out) -> None:
    """quality.md and quality.json in the folder `out` (written whole or not at all)."""
    os.makedirs(out, exist_ok=True)
    for name, text in (("quality.md", format_quality(rows)), ("quality.json", json.dumps(rows, indent=1))):
        tmp = os.path.join(out, name + ".partial")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
