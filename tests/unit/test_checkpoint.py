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
