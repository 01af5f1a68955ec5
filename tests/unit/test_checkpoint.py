"""save_adapters / load_adapters: round trip, stable names, and refusal of other models or configs."""
import dataclasses
import json

import pytest
import torch

import architectures
import meft_fx
from meft_fx.checkpoint import CONFIG_NAME, WEIGHTS_NAME, adapter_config


def trainable_names(model):
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


def predict(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    model.train()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT, converted and trained a few steps (adapters and head move), saved to a folder."""
    torch.manual_seed(0)
    arch = architectures.make("bert", dtype=torch.float64)
    base_dir = tmp_path_factory.mktemp("base")
    arch.model.save_pretrained(base_dir)
    inputs = arch.make_inputs(4, 8)
    rev = meft_fx.convert(arch.model)
    opt = torch.optim.AdamW([p for p in rev.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        rev(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in rev.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
    folder = tmp_path_factory.mktemp("adapters")
    meft_fx.save_adapters(rev, folder)
    return arch, base_dir, inputs, rev, folder


def fresh_base(base_dir):
    from transformers import BertForSequenceClassification
    return BertForSequenceClassification.from_pretrained(base_dir, dtype=torch.float64).train()


@pytest.mark.slow  # ~7 s; every load test below also loads into a fresh conversion
def test_trainable_names_are_stable_between_conversions(saved):
    arch, base_dir, *_ = saved
    a = meft_fx.convert(arch.model)
    b = meft_fx.convert(fresh_base(base_dir))
    assert trainable_names(a) == trainable_names(b)
    assert any("graph_module." in n for n, _ in trainable_names(a))  # the rewritten path is part of the name
    assert all("meft_adapter" in n or n.startswith("classifier.") for n, _ in trainable_names(a))


def test_files_and_json_contents(saved):
    arch, _, _, rev, folder = saved
    assert (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file()
    record = json.loads((folder / CONFIG_NAME).read_text())
    cfg = rev.meft_config
    assert record["method"] == cfg.method == "meft3" and record["adapter_rank"] == cfg.adapter_rank == 8
    assert record["numerics"] == cfg.numerics and (record["lam"], record["beta"]) == cfg.scales[:2]
    assert record["meft_config"] == rev.meft_config.to_dict()
    assert record["base_model"]["class"] == "BertForSequenceClassification"
    params = record["parameters"]
    assert [(n, tuple(s["shape"])) for n, s in params.items()] == trainable_names(rev)
    assert "classifier.weight" in params  # the fresh task head is saved with the adapters
    fp = record["base_model"]["fingerprint"]["tensors"]
    # frozen weights are fingerprinted under their names in the unconverted model
    assert "bert.encoder.layer.0.attention.self.query.weight" in fp and not any(n in fp for n in params)
    from safetensors.torch import load_file
    tensors = load_file(folder / WEIGHTS_NAME)
    named = dict(rev.named_parameters())
    assert set(tensors) == set(params)
    assert all(torch.equal(tensors[n], named[n].detach()) for n in tensors)


def test_load_into_fresh_conversion_reproduces_predictions(saved):
    _, base_dir, inputs, rev, folder = saved
    fresh = meft_fx.convert(fresh_base(base_dir))
    ref = predict(rev, inputs)
    assert not torch.equal(predict(fresh, inputs), ref)  # fresh adapters: different predictions
    assert meft_fx.load_adapters(fresh, folder) is fresh
    assert torch.equal(predict(fresh, inputs), ref)
    # and training goes on from there exactly as it would have from the original
    torch.manual_seed(1)
    loss_a = rev(**inputs).loss
    torch.manual_seed(1)
    loss_b = fresh(**inputs).loss
    assert torch.equal(loss_a, loss_b)


def test_from_pretrained_converts_and_loads_in_one_step(saved, capsys):
    _, base_dir, inputs, rev, folder = saved
    one = meft_fx.from_pretrained(fresh_base(base_dir), folder, chunk_loss=False)
    assert torch.equal(predict(one, inputs), predict(rev, inputs))
    assert one.meft_config.chunk_loss is False and one.meft_config.method == rev.meft_config.method
    with pytest.raises(ValueError, match="adapter_rank would change the network"):
        meft_fx.from_pretrained(fresh_base(base_dir), folder, adapter_rank=4)
    n_train, n_all = meft_fx.trainable_parameters(one)
    assert n_train == sum(p.numel() for p in one.parameters() if p.requires_grad) and 0 < n_train < n_all
    line = meft_fx.print_trainable_parameters(one)
    assert capsys.readouterr().out.strip() == line == (
        f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%: {100 * n_train / n_all:.4f}")


def test_settings_that_do_not_change_the_network_may_differ(saved):
    _, base_dir, inputs, rev, folder = saved
    lam, beta, _ = rev.meft_config.scales
    cfg = dataclasses.replace(rev.meft_config, reversible=False, adapter_dropout=0.0, adapter_init_std=0.5,
                              lam=lam, beta=beta)  # λ, β given explicitly: the same values as the defaults
    other = meft_fx.convert(fresh_base(base_dir), cfg)
    meft_fx.load_adapters(other, folder)
    assert torch.equal(predict(other, inputs), predict(rev, inputs))
    assert adapter_config(folder) == rev.meft_config


@pytest.mark.parametrize("change, words", [
    (dict(method="meft1"), ["method: saved 'meft3'", "model converted with 'meft1'"]),
    (dict(adapter_rank=4), ["adapter_rank: saved 8", "other shapes"]),
    (dict(lam=0.5), ["lam: saved {lam!r}", "model converted with 0.5"]),
])
def test_other_config_is_refused(saved, change, words):
    _, base_dir, _, rev, folder = saved
    other = meft_fx.convert(fresh_base(base_dir), dataclasses.replace(rev.meft_config, **change))
    words = [w.format(lam=rev.meft_config.scales[0]) for w in words]
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(meft_fx.AdapterMismatchError) as e:
        meft_fx.load_adapters(other, folder)
    msg = str(e.value)
    assert str(folder) in msg and "adapter_config" in msg
    for w in words:
        assert w in msg, msg
    assert "frozen tensors" not in msg  # the same base model: no complaint about its weights
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # untouched
    assert isinstance(e.value, ValueError)


def test_other_base_weights_are_refused(saved):
    _, _, _, _, folder = saved
    other = meft_fx.convert(architectures.make("bert", dtype=torch.float64, seed=1).model)
    with pytest.raises(meft_fx.AdapterMismatchError, match=r"base model weights: .*frozen tensors differ "
                                                            r"\(bert\.embeddings\.word_embeddings\.weight"):
        meft_fx.load_adapters(other, folder)


def test_other_model_class_is_refused(saved):
    _, _, _, _, folder = saved
    other = meft_fx.convert(architectures.make("roberta", dtype=torch.float64).model)
    with pytest.raises(meft_fx.AdapterMismatchError, match="model class: saved for BertForSequenceClassification, "
                                                            "this is RobertaForSequenceClassification"):
        meft_fx.load_adapters(other, folder)


def test_unconverted_model_and_missing_folder(saved, tmp_path):
    arch, _, _, rev, folder = saved
    with pytest.raises(ValueError, match="not converted by meft_fx.convert"):
        meft_fx.load_adapters(arch.model, folder)
    with pytest.raises(ValueError, match="not converted by meft_fx.convert"):
        meft_fx.save_adapters(arch.model, tmp_path)
    with pytest.raises(FileNotFoundError, match="meft_fx.save_adapters"):
        meft_fx.load_adapters(rev, tmp_path / "nothing")


# ----------------------------------------------------------------------------- damaged folders (issue 14)

def _damaged_copy(folder, tmp_path, name):
    import shutil
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def _adapter_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def fresh(saved):
    """A fresh conversion of the saved base, shared by the damaged-folder tests (a refused load changes nothing)."""
    _, base_dir, _, _, folder = saved
    return meft_fx.convert(fresh_base(base_dir), adapter_config(folder))


def test_a_folder_whose_weights_disagree_with_its_json_changes_nothing(saved, fresh, tmp_path):
    from safetensors.torch import load_file, save_file
    _, base_dir, _, _, folder = saved
    bad = _damaged_copy(folder, tmp_path, "bad")
    tensors = load_file(str(bad / WEIGHTS_NAME))
    last = sorted(tensors)[-1]
    tensors[last] = torch.zeros(3, 3, dtype=tensors[last].dtype)  # one tensor of another shape, the rest fine
    save_file(tensors, str(bad / WEIGHTS_NAME))
    record = json.loads((bad / CONFIG_NAME).read_text())
    record.pop("weights_sha256")  # as an older save would be: the shape check alone must catch it
    (bad / CONFIG_NAME).write_text(json.dumps(record))
    before = _adapter_values(fresh)
    with pytest.raises(meft_fx.AdapterMismatchError, match="disagrees with .* shape.*not changed"):
        meft_fx.load_adapters(fresh, bad)
    after = _adapter_values(fresh)
    assert all(torch.equal(before[n], after[n]) for n in before)  # not one parameter overwritten


def test_flipped_bytes_in_the_weights_are_detected(saved, fresh, tmp_path):
    _, base_dir, _, _, folder = saved
    bad = _damaged_copy(folder, tmp_path, "flipped")
    data = bytearray((bad / WEIGHTS_NAME).read_bytes())
    for i in range(len(data) - 100, len(data)):  # 100 bytes of the data region
        data[i] ^= 0xFF
    (bad / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(meft_fx.AdapterMismatchError, match="SHA-256"):
        meft_fx.load_adapters(fresh, bad)


@pytest.mark.parametrize("which", [CONFIG_NAME, WEIGHTS_NAME])
def test_truncated_files_are_named(saved, fresh, tmp_path, which):
    _, base_dir, _, _, folder = saved
    bad = _damaged_copy(folder, tmp_path, "truncated")
    data = (bad / which).read_bytes()
    (bad / which).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        meft_fx.load_adapters(fresh, bad)
    assert str(bad / which) in str(e.value) and ("truncated" in str(e.value) or "damaged" in str(e.value))


def test_a_base_in_another_dtype_is_named_as_such(saved):
    _, base_dir, _, _, folder = saved
    fresh = meft_fx.convert(fresh_base(base_dir).to(torch.float32), adapter_config(folder))
    with pytest.raises(meft_fx.AdapterMismatchError, match=r"base model dtype: .*float64 base.*float32") as e:
        meft_fx.load_adapters(fresh, folder)
    assert "frozen tensors differ" not in str(e.value)


def test_save_leaves_no_temporary_files_and_records_the_hash(saved):
    *_, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    record = json.loads((folder / CONFIG_NAME).read_text())
    import hashlib
    assert record["weights_sha256"] == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()


def test_a_frozen_tensor_past_2_to_the_24_elements_is_fingerprinted():
    """A real vocabulary's embedding (SmolLM2: 49152 × 576 = 28.3 M elements): float32 sample positions round up
    to the element count past 2^24; they are clamped (smaller tensors keep the positions folders were hashed with)."""
    from meft_fx.checkpoint import _tensor_digest

    big = torch.zeros(49152, 576)
    digest = _tensor_digest(big)
    big[-1, -1] = 1.0  # the last element is one of the samples
    assert _tensor_digest(big) != digest
