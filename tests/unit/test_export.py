"""torch.export of a converted, trained decoder with the default (exact) numerics: dynamic batch and
sequence, outputs equal to the model's, save/load in a fresh process that does not import meft_fx."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf

import meft_fx

VOCAB = 96


def _trained_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=VOCAB, attn_implementation="sdpa", pad_token_id=0)
    rev = meft_fx.convert(tf.LlamaForCausalLM(cfg))
    ids = torch.randint(3, VOCAB, (2, 6))
    opt = torch.optim.SGD([p for p in rev.parameters() if p.requires_grad], lr=0.5)
    rev(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    opt.step()
    return rev.eval()


def _inputs(batch, seq, pad=0):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 7 + seq))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding in the first row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.slow
def test_export_round_trip_in_a_fresh_process(tmp_path):
    rev = _trained_llama()
    batch, seq = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    ep = torch.export.export(rev, (), _inputs(2, 7), dynamic_shapes=dims)
    cases = [_inputs(2, 7), _inputs(3, 11, pad=4), _inputs(1, 5)]
    with torch.no_grad():
        expected = [rev(**c).logits for c in cases]
        for c, want in zip(cases, expected):
            assert torch.equal(ep.module()(**c).logits, want)
    torch.export.save(ep, tmp_path / "rev.pt2")
    torch.save({"cases": cases, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})  # the parent's: a product's bits depend on the thread count
        import transformers.modeling_outputs  # registers the output class with pytree
        ep = torch.export.load({str(tmp_path / "rev.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            ok = [torch.equal(ep.module()(**c).logits, e) for c, e in zip(io["cases"], io["expected"])]
        assert all(ok), ok
        assert "meft_fx" not in sys.modules
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.slow
def test_export_keeps_the_overflow_check_as_an_op():
    """The exact stack's range checks are ops of the exported program (not Python-side guards)."""
    rev = _trained_llama()
    ep = torch.export.export(rev, (), _inputs(2, 7))
    assert any("_assert_async" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        next(p for n, p in rev.named_parameters() if n.endswith("up.bias")).fill_(float("inf"))
    with pytest.raises(RuntimeError, match="NaN, infinite or overflow"):
        torch.export.export(rev, (), _inputs(2, 7)).module()(**_inputs(2, 7))
