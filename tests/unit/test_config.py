from dataclasses import replace

import pytest

from meft_fx import MEFTConfig
from meft_fx.config import LayerShape


def test_defaults_and_paper_scales():
    assert MEFTConfig().method == "auto"
    assert MEFTConfig().numerics == "exact"
    assert MEFTConfig(method="meft1", numerics="float").scales == (0.1, 1.0, True)
    assert MEFTConfig(method="meft2", numerics="float").scales == (1.0, 0.1, True)
    assert MEFTConfig(method="meft3", numerics="float").scales == (0.1, 0.1, False)
    assert MEFTConfig(method="meft3", numerics="float", lam=0.5).scales == (0.5, 0.1, False)


def test_exact_defaults_are_powers_of_two():
    from meft_fx.config import EXACT_DEFAULT_K as k
    assert MEFTConfig(method="meft1").scales == (2.0 ** -k, 1.0, True)
    assert MEFTConfig(method="meft2").scales == (1.0, 2.0 ** -k, True)
    assert MEFTConfig(method="meft3").scales == (2.0 ** -k, 2.0 ** -k, False)
    assert MEFTConfig(method="meft3", lam=0.5).scales == (0.5, 2.0 ** -k, False)
    assert MEFTConfig(method="meft3", lam=0.5).exponents == (1, k)


@pytest.mark.parametrize("field,value,allowed", [
    ("method", "meft4", "'meft1', 'meft2', 'meft3'"),
    ("numerics", "fixed", "'float', 'exact'"),
    ("capture", "jit", "'auto', 'export', 'fx'"),
    ("output", "h1", "'pretrained', 'mean'"),
    ("adapter_activation", "swish", "'relu'"),
])
def test_bad_choice_names_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as e:
        MEFTConfig(**{field: value})
    assert f"MEFTConfig.{field}={value!r}" in str(e.value)
    assert allowed in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("lam", 0.0), ("lam", -1.0), ("lam", 2.0), ("beta", "0.1"), ("adapter_rank", 0), ("adapter_rank", 2.5),
    ("adapter_dropout", 1.0), ("adapter_init_std", 0.0), ("reversible", "yes"),
    ("adapter_init_std", float("inf")), ("adapter_init_std", float("nan")), ("frac_bits", 4), ("frac_bits", 63),
    ("lam", 2.0 ** -63), ("beta", 2.0 ** -17),
])
def test_bad_numbers_raise_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=f"MEFTConfig.{field}="):
        MEFTConfig(**{field: value})


def test_to_dict_round_trips():
    cfg = MEFTConfig(method="meft1", lam=0.25, adapter_rank=4)
    assert MEFTConfig(**cfg.to_dict()) == cfg


def test_tiny_float_scales_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"MEFTConfig.lam=1e-300 is below .*non-finite gradients"):
        MEFTConfig(numerics="float", lam=1e-300)
    MEFTConfig(numerics="float", lam=2.0 ** -16)  # the smallest accepted


def test_a_config_changed_in_place_is_caught_by_validate():
    cfg = MEFTConfig()
    cfg.lam = 2.0 ** -63
    with pytest.raises(ValueError, match="MEFTConfig.lam="):
        cfg.validate()
    cfg.lam, cfg.adapter_init_std = None, float("inf")
    with pytest.raises(ValueError, match="MEFTConfig.adapter_init_std=inf"):
        cfg.validate()


def test_method_auto_is_chosen_per_model():
    from meft_fx import ConversionError

    cfg = MEFTConfig()
    with pytest.raises(ValueError, match="chosen per model by convert"):
        cfg.spec
    parallel, llama = LayerShape(parallel=("h.0",), pre_norm=True), LayerShape(pre_norm=True, gated_ffn=True)
    assert cfg.resolved().method == "meft3" and cfg.resolved(parallel).method == "meft1"
    assert cfg.resolved(llama).method == "meft1" and "stores k bits" in cfg.method_reason(llama)
    for shape, why in ((replace(llama, routed_experts=True), "routed experts"),
                       (replace(llama, gated_ffn=False), "FFNs without a gate"),
                       (replace(llama, pre_norm=False), "post-norm layers")):
        assert cfg.resolved(shape).method == "meft3" and why in cfg.method_reason(shape)
    assert MEFTConfig(numerics="float").resolved(llama).method == "meft3"
    assert MEFTConfig(method="meft2").resolved(parallel).method == "meft2"
    assert MEFTConfig(method="meft3").method_reason(llama) == "asked for (MEFTConfig.method='meft3')"
    with pytest.raises(ConversionError, match="h.0 is a parallel-residual layer.*'meft1' or 'meft2'"):
        MEFTConfig(method="meft3").resolved(parallel)
