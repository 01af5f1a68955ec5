"""The starting point: convert measures how far the converted model starts from the original, chooses the scale
by it (fewest stored bits within the tolerance), reports it in explain and warns beyond it."""
import json

import pytest
import torch

import meft_fx
from architectures import make, tiny_decoder
from stacks import every_stack
from meft_fx import MEFTConfig
from meft_fx import starting_point as sp
from meft_fx.conversion import ConvertedModule


def converted_modules(model):
    return [m for m in model.modules() if isinstance(m, ConvertedModule)]


def couplings(model):
    return [c for st in every_stack(model) for c in st.couplings]


def test_a_causal_lm_is_measured_on_text_it_samples_itself_and_the_chosen_scale_is_used_everywhere():
    model = tiny_decoder("Llama")
    state = torch.get_rng_state()
    probe = sp.sample_probe(model)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert probe["input_ids"].shape == (sp.PROBE_SEQUENCES, sp.PROBE_TOKENS) and bool((probe["attention_mask"] == 1).all())
    assert torch.equal(sp.sample_probe(model)["input_ids"], probe["input_ids"])  # seeded
    rev = meft_fx.convert(model)
    point = rev.model.starting_point
    assert point.metric == "kl" and point.within and point.chosen == "measured" and 0 <= point.agreement <= 1
    assert "sampled" in point.probe and list(point.tried) == [*range(2, point.scale_bits + 1), 12]  # 12: the floor
    assert point.floor == point.tried[12] and point.distance - point.floor <= point.tolerance
    k = rev.meft_config.scale_bits
    assert rev.meft_config.method == "meft1"  # method="auto" on a pre-norm decoder with gated FFNs: λ only
    assert k == point.scale_bits and point.stored_bits == k
    assert all((c.lam, c.beta) == (2.0 ** -k, 1.0) for c in couplings(rev))
    rev.train()(input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss.backward()
    assert all((c.lam, c.beta) == (2.0 ** -k, 1.0) for c in couplings(rev))  # a new capture uses it too
    text = str(meft_fx.explain(rev, estimate_memory=False))
    assert "starting point" in text and f"2^-{k} (measured)" in text and "KL of next-token distributions" in text


def scripted(monkeypatch, script):
    """measure() answers script[k] for the scale k the converted module has."""
    monkeypatch.setattr(sp, "measure", lambda model, conv, call, ref: ("kl", script[conv.config.scale_bits], 0.9))


def test_the_search_stops_at_the_first_scale_within_the_tolerance_of_the_floor(monkeypatch):
    scripted(monkeypatch, {12: 0.004, 2: 0.5, 3: 0.05, 4: 0.0135, 5: 0.006})
    rev = meft_fx.convert(tiny_decoder("Llama"))  # 0.0135 − 0.004 ≤ 0.01: k = 4, though 0.0135 itself is not
    point = rev.model.starting_point
    assert rev.meft_config.scale_bits == 4 and point.tried == {2: 0.5, 3: 0.05, 4: 0.0135, 12: 0.004}
    assert point.within and point.floor == 0.004 and point.tolerance == 0.01
    assert all((c.lam, c.beta) == (2.0 ** -4, 1.0) for c in couplings(rev))  # MEFT1 (method="auto")
    meft3 = meft_fx.convert(tiny_decoder("Llama"), MEFTConfig(method="meft3"))  # both streams scaled
    assert meft3.meft_config.scale_bits == 4 and meft3.model.starting_point.stored_bits == 8
    assert all((c.lam, c.beta) == (2.0 ** -4, 2.0 ** -4) for c in couplings(meft3))


def test_a_floor_beyond_the_tolerance_warns_and_names_the_adapters_init(monkeypatch):
    scripted(monkeypatch, {12: 0.2, 2: 0.5, 3: 0.215, 4: 0.205})
    with pytest.warns(sp.StartWarning, match="starts far from the original") as w:
        rev = meft_fx.convert(tiny_decoder("Llama"))
    assert "adapter_init_std" in str(w[0].message) and "smaller scale" not in str(w[0].message)
    assert rev.meft_config.scale_bits == 4 and all(c.lam == 2.0 ** -4 for c in couplings(rev))
    assert not rev.model.starting_point.within


def test_a_given_scale_is_measured_once_and_a_far_one_warns_with_the_fix(monkeypatch):
    scripted(monkeypatch, {12: 0.001, 3: 0.05})
    far = r"the scale adds 0.0490 \(tolerance 0.01 for that and for the floor, EXCEEDED\)"
    with pytest.warns(sp.StartWarning, match=far) as w:
        rev = meft_fx.convert(tiny_decoder("Llama"), MEFTConfig(scale_bits=3))
    point = rev.model.starting_point
    assert point.chosen == "given" and list(point.tried) == [3, 12] and rev.meft_config.scale_bits == 3
    assert "larger k" in str(w[0].message) and "adapter_init_std" not in str(w[0].message)
    assert all(c.lam == 2.0 ** -3 for c in couplings(rev))


def test_example_inputs_are_the_probe_and_a_model_without_a_vocabulary_head_uses_cosine():
    arch = make("bert")
    rev = meft_fx.convert(arch.model, example_inputs=arch.make_inputs(2, 6))
    point = converted_modules(rev)[0].starting_point
    assert point.metric == "cosine" and point.probe == "the example inputs" and point.agreement is None
    assert 0 <= point.distance <= point.tolerance


def test_float_numerics_and_hand_given_scales_are_kept_and_measured():
    rev = meft_fx.convert(tiny_decoder("Llama"), MEFTConfig(numerics="float"))
    assert rev.model.starting_point.scale_bits is None and rev.meft_config.scale_bits is None
    assert all((c.lam, c.beta) == (0.1, 0.1) for c in couplings(rev))
    rev = meft_fx.convert(tiny_decoder("Llama"), MEFTConfig(lam=2.0 ** -3, beta=2.0 ** -6))
    assert all((c.lam, c.beta) == (2.0 ** -3, 2.0 ** -6) for c in couplings(rev))
    assert rev.meft_config.scale_bits is None and rev.model.starting_point.chosen == "given"


def test_leak_compensation_is_on_for_pretrained_halves_and_the_papers_form_is_reachable():
    rev = meft_fx.convert(tiny_decoder("Llama"), MEFTConfig(method="meft1", scale_bits=4))
    assert all(c.compensate_f and not c.compensate_g for c in couplings(rev))  # G: an adapter alone
    paper = meft_fx.convert(tiny_decoder("Llama"), MEFTConfig(leak_compensation=False, scale_bits=4))
    assert not any(c.compensate_f or c.compensate_g for c in couplings(paper))


def test_saved_adapters_keep_the_chosen_scale_and_old_folders_load_as_the_papers_form(tmp_path):
    rev = meft_fx.convert(tiny_decoder("Llama"))
    meft_fx.save_adapters(rev, tmp_path)
    cfg = meft_fx.adapter_config(tmp_path)
    assert cfg.scale_bits == rev.meft_config.scale_bits and cfg.leak_compensation
    again = meft_fx.from_pretrained(tiny_decoder("Llama"), tmp_path)
    assert again.model.starting_point.chosen == "given"  # not searched again
    record = json.loads((tmp_path / "meft_adapters.json").read_text())
    del record["meft_config"]["leak_compensation"]  # as saved before leak compensation existed
    (tmp_path / "meft_adapters.json").write_text(json.dumps(record))
    assert meft_fx.adapter_config(tmp_path).leak_compensation is False


@pytest.mark.parametrize("field, value", [("scale_bits", 17), ("scale_bits", -1), ("start_tolerance", 0.0),
                                          ("leak_compensation", "yes")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"MEFTConfig.{field}="):
        MEFTConfig(**{field: value})
