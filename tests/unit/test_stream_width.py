"""`meft_fx.stream_width`: the exact streams' width convert chooses (MEFTConfig.stream_bits=None)."""
import pytest
import torch

import architectures
from stacks import every_stack
import meft_fx
from meft_fx.stream_width import HEADROOM, _choice


@pytest.mark.parametrize("reach, dtype, given, want", [
    (24448.0, torch.bfloat16, None, (32, 14)),   # SmolLM2 in bf16: 4 × 24448 < 2^17 → 31 − 17 = 14
    (3.0, torch.bfloat16, None, (32, 16)),       # small activations: at most 16 (INT32_FRAC_BITS)
    (3.0, torch.float16, 12, (32, 12)),          # frac_bits given and within the range: kept
    (24448.0, torch.bfloat16, 16, (64, 16)),     # frac_bits given beyond the range: int64 with them
    (2.0 ** 18, torch.bfloat16, None, (64, 32)),  # int32 would leave 11 < 12 fractional bits
    (3.0, torch.float32, None, (64, 32)),        # float32: int64 (int32 would be coarser than its rounding)
    (None, torch.bfloat16, None, (64, 32)),      # not measured
])
def test_the_choice(reach, dtype, given, want):
    c = _choice(reach, dtype, given)
    assert (c.bits, c.frac_bits) == want, c
    if c.bits == 32:  # the stream fits with the headroom
        assert HEADROOM * reach < 2.0 ** (31 - c.frac_bits)


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 32), pytest.param(torch.float32, 64, marks=pytest.mark.slow)])
def test_convert_chooses_and_says_so_and_saving_keeps_it(tmp_path, dtype, bits):
    arch = architectures.make("llama", dtype=dtype)
    rev = meft_fx.convert(arch.model, meft_fx.MEFTConfig(verbose=False))
    assert all(st.stream_bits == bits for st in every_stack(rev)) and rev.meft_config.stream_bits == bits
    report = meft_fx.explain(rev, False)
    assert f"int{bits} with {rev.meft_config.frac_bits} fractional bits" in str(report)
    st = report.stored[0]  # in bf16 the same model's streams would be int32 (its reach is small): so accounted
    assert st.stream_bits == bits and st.total_bits_in(16) == 2 * 32 + st.layers * st.layer_bits
    meft_fx.save_adapters(rev, tmp_path)
    again = meft_fx.from_pretrained(architectures.make("llama", dtype=dtype).model, tmp_path, verbose=False)
    assert [(s.stream_bits, s.frac_bits) for s in every_stack(again)] == [(s.stream_bits, s.frac_bits) for s in every_stack(rev)]


@pytest.mark.slow
def test_a_given_width_is_kept():
    arch = architectures.make("llama", dtype=torch.bfloat16)
    rev = meft_fx.convert(arch.model, meft_fx.MEFTConfig(verbose=False, stream_bits=64))
    assert all(st.stream_bits == 64 for st in every_stack(rev)) and "exact streams" not in str(meft_fx.explain(rev, False))
