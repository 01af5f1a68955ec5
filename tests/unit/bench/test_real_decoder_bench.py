"""The benches on the real SmolLM2-135M-Instruct at tiny size (its first layers): the memory bench's rows, the
quality bench's rows and report, the task's batches (loss on the answer only)."""
import pytest
import torch

from meft_fx import pretrained
from meft_fx.bench import quality, tasks
from meft_fx.bench import run as bench

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task():
    return tasks.SentimentChat(pretrained.smollm2_tokenizer())


def test_the_task_masks_the_prompt_and_pads_on_the_right(task):
    (text, label), (text2, label2) = tasks.rotten_tomatoes()[:2]
    ex = task.example(text, label)
    prompt = task.prompt_ids(text)
    assert ex["input_ids"][: len(prompt)] == prompt and ex["labels"][: len(prompt)] == [-100] * len(prompt)
    assert task.tok.decode(ex["labels"][len(prompt):], skip_special_tokens=True) == tasks.ANSWERS[label]
    batch = task.batch([(text, label), (text2 * 3, label2)])
    n = len(ex["input_ids"])
    assert batch["input_ids"].shape[0] == 2 and bool((batch["attention_mask"][0, n:] == 0).all())
    assert bool((batch["labels"][0, n:] == -100).all()) and int(batch["attention_mask"][0].sum()) == n


def test_the_split_is_seeded_and_disjoint():
    data = tasks.rotten_tomatoes()
    train, held = tasks.split(data, 50, 20, seed=3)
    assert (train, held) == tasks.split(data, 50, 20, seed=3) and not set(train) & set(held)
    with pytest.raises(ValueError, match="train_size"):
        tasks.split(data, 0, 20)


def test_the_memory_bench_runs_on_the_real_model():
    rows = bench.run_benchmark(hidden=0, depths=[2], seqs=[48], batch=1, arch="smollm2", repeats=1, progress=False,
                               methods=["lora_ckpt", "lora_ckpt_chunked", "meft3_exact"])
    by = {r["method"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    assert "(measured)" in by["meft3_exact"]["note"] and "SmolLM2" in rows[0]["title"]
    assert by["meft3_exact"]["activation_mib"] < by["lora_ckpt"]["activation_mib"]
    # what each keeps per element: checkpointing one fp32 (bf16: 16-bit) input per layer; meft_fx two int64 streams
    # (in bf16 int32, as convert chooses for this model there: meft_fx.stream_width) and 2k bits per layer
    assert rows[0]["hidden"] == 576 and (by["lora_ckpt"]["stored_bits"], by["lora_ckpt"]["stored_bits_bf16"]) == (64, 32)
    meft = by["meft3_exact"]
    assert meft["stored_bits"] - meft["stored_bits_bf16"] == 64 and (meft["stored_bits"] - 128) % 4 == 0
    assert "| 2 | meft3_exact | " in bench.format_stored(rows)


def test_the_quality_bench_from_the_command_line(tmp_path, capsys):
    rows = bench.main(["--quality", "--layers", "2", "--steps", "2", "--batch", "2", "--train-size", "8",
                       "--eval-size", "4", "--lrs", "meft=1e-3", "lora_qv=1e-3", "lora_all=1e-3", "--out",
                       str(tmp_path)])
    assert [r["method"] for r in rows] == ["meft", "lora_qv", "lora_all"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["step_s"] > 0 and r["activation_mib"] > 0 and r["trainable_params"] > 0
    text = (tmp_path / "quality.md").read_text()
    assert "| LoRA r=8 on q, v | 0.001 |" in text and (tmp_path / "quality.json").is_file()
    assert "| meft_fx default (MEFT1, exact, k measured) | 0.001 |" in text  # what "auto" chose for this decoder
    assert rows[0]["meft_method"] == "meft1" and rows[1]["meft_method"] is None
    assert "held-out accuracy" in capsys.readouterr().out
    # one method again: the others' rows are kept from the folder's earlier run
    again = bench.main(["--quality", "--quality-methods", "meft", "--layers", "2", "--steps", "1", "--batch", "2",
                        "--train-size", "8", "--eval-size", "4", "--lrs", "meft=3e-3", "--out", str(tmp_path)])
    assert [(r["method"], r["lr"]) for r in again] == [("meft", 3e-3), ("lora_qv", 1e-3), ("lora_all", 1e-3)]
    assert again[1:] == rows[1:] and "meft lr 0.003" in (tmp_path / "quality.md").read_text()
    for bad in (["--lrs", "sgd=1"], ["--quality-methods", "meft,sgd"]):
        with pytest.raises(SystemExit):
            bench.main(["--quality", *bad])
    assert quality.parse_lrs(["meft=1e-3,3e-3"]) == {"meft": (1e-3, 3e-3)}
    assert torch.get_num_threads() >= 1
