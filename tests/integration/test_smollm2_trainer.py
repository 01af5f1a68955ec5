"""Instruction tuning as people do it, on the real SmolLM2 (its first 4 layers): chat-formatted examples with the
loss on the response only, through the HF Trainer; saved, loaded in one step with from_pretrained, and generating
with the chat template and the KV cache the tokens the trained model generates."""
import re

import pytest
import torch

import meft_fx
from meft_fx import pretrained
from meft_fx.bench import tasks

pytestmark = pytest.mark.slow
pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

LAYERS = 4


def test_trainer_with_response_only_loss_then_from_pretrained_generates_the_same(tmp_path):
    hf_logging.set_verbosity_error()
    base, tok = pretrained.smollm2(layers=LAYERS)
    task = tasks.SentimentChat(tok, max_review_tokens=24)
    train, held = tasks.split(tasks.rotten_tomatoes(), 48, 4, seed=1)
    data = [task.example(t, y) for t, y in train]
    assert all(-100 in e["labels"] and e["labels"][-1] == tok.eos_token_id for e in data)  # the answer only
    torch.manual_seed(0)
    rev = meft_fx.convert(base)
    before = {n: p.detach().clone() for n, p in rev.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], logging_steps=100, seed=0, use_cpu=True,
                             disable_tqdm=True, save_strategy="no", remove_unused_columns=False)
    trainer = Trainer(model=rev, args=args, train_dataset=data, data_collator=task.collate)
    result = trainer.train()
    assert result.training_loss > 0
    assert any(not torch.equal(p, before[n]) for n, p in rev.named_parameters() if p.requires_grad)
    trainer.save_model(str(tmp_path / "final"))

    again = meft_fx.from_pretrained(pretrained.smollm2(layers=LAYERS)[0], tmp_path / "final")
    ids = pretrained.chat_prompt(tok, tasks.PROMPT.format(text=held[0][0]))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    rev.eval()
    trained = rev.generate(ids, **kw)
    assert torch.equal(again.eval().generate(ids, **kw), trained)
    assert torch.equal(rev.generate(ids, use_cache=False, **kw), trained)  # the KV cache changes nothing
    assert again.generation_config.use_cache  # generate() above ran with the cache


def test_the_main_job_runs_end_to_end_at_tiny_size(tmp_path, capsys):
    """examples/finetune_smollm2.py (the README's first command) on 2 of the model's layers, 2 steps."""
    import runpy
    import sys

    argv = ["finetune_smollm2.py", "--layers", "2", "--steps", "2", "--batch", "2", "--train-size", "8",
            "--eval-size", "4", "--out", str(tmp_path / "adapters")]
    old, sys.argv = sys.argv, argv
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(pretrained.Path(__file__).resolve().parents[2] / "examples" / "finetune_smollm2.py"),
                           run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    for part in ("== convert", "starting point:", "LoRA (q/v) + gradient checkpointing", "held-out accuracy",
                 "gives the same logits: True", "done in"):
        assert part in out, part
    # the README shows a whole run: the same sections, and each printed line's opening words
    readme = (pretrained.Path(__file__).resolve().parents[2] / "README.md").read_text()
    shown = re.search(r"## The main job\n.*?```\n(.*?)```", readme, re.S).group(1)
    heads = lambda text: [" ".join(line.split()[:2]).rstrip("(,0123456789") for line in text.splitlines()  # noqa
                          if line.startswith(("==", "starting point", "stored per", "batch (", "held-out", "adapters"))]
    assert heads(out) == heads(shown)


def test_trl_sft_trainer_trains_a_converted_model_on_completions_only(tmp_path):
    """TRL's SFTTrainer takes a converted model as it is: prompt/completion chat data, the loss on the completion
    only (its collator masks the prompt); its gradient checkpointing is a warned no-op; the saved adapters load in
    one step and generate what the trained model generates."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    hf_logging.set_verbosity_error()
    base, tok = pretrained.smollm2(layers=LAYERS)
    train, held = tasks.split(tasks.rotten_tomatoes(), 16, 2, seed=1)
    rows = [{"prompt": [{"role": "user", "content": tasks.PROMPT.format(text=t[:200])}],
             "completion": [{"role": "assistant", "content": tasks.ANSWERS[y]}]} for t, y in train]
    torch.manual_seed(0)
    rev = meft_fx.convert(base)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=100)
    with pytest.warns(UserWarning, match="nothing to checkpoint"):
        trainer = SFTTrainer(model=rev, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.train()
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(answer, skip_special_tokens=True).strip() in tasks.ANSWERS  # the completion, nothing else
    trainer.save_model(str(tmp_path / "final"))
    again = meft_fx.from_pretrained(pretrained.smollm2(layers=LAYERS)[0], tmp_path / "final")
    ids = pretrained.chat_prompt(tok, tasks.PROMPT.format(text=held[0][0]))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(again.eval().generate(ids, **kw), rev.eval().generate(ids, **kw))
