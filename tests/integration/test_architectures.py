"""Sanity of the test-support module tests/architectures.py: every architecture builds and runs."""
import pytest
import torch

from architectures import ARCHITECTURES, make


def _loss_and_logits(out):
    if type(out) is dict:  # hand-written models
        return out.get("loss"), out["logits"]
    return getattr(out, "loss", None), out[0] if out.get("loss") is None else out[1]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_builds_and_runs_two_shapes(name):
    arch = make(name, dtype=torch.float64, num_layers=2)
    assert arch.name == name and arch.model.training
    assert arch.num_stacks == (2 if name == "bart" else 1)
    assert arch.hf == (not name.endswith("_custom"))
    assert all(p.dtype == torch.float64 for p in arch.model.parameters())
    for batch, seq in [(2, 7), (3, 11)]:
        inputs = arch.make_inputs(batch, seq)
        again = arch.make_inputs(batch, seq)
        assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
        loss, out = _loss_and_logits(arch.model(**inputs))
        assert out.shape[0] == batch and torch.isfinite(out).all()
        if name == "t5_encoder":
            assert loss is None and "labels" not in inputs
        else:
            assert loss.dim() == 0 and torch.isfinite(loss)
    (out.sum() if loss is None else loss).backward()
    assert any(p.grad is not None for p in arch.model.parameters())


def test_seeded_and_dropout_on():
    a, b = make("bert", seed=3), make("bert", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    inputs = a.make_inputs(2, 5)
    assert not torch.equal(a.model(**inputs).logits, a.model(**inputs).logits)  # train mode: dropout
    a.model.eval()
    assert torch.equal(a.model(**inputs).logits, a.model(**inputs).logits)


def test_num_layers_and_custom_fx_trace():
    arch = make("prenorm_custom", num_layers=3)
    assert len(arch.model.layers) == 3
    gm = torch.fx.symbolic_trace(arch.model)
    inputs = arch.make_inputs(2, 6)
    torch.manual_seed(0)
    expected = arch.model(**inputs)["loss"]
    torch.manual_seed(0)
    assert torch.equal(gm(**inputs)["loss"], expected)
