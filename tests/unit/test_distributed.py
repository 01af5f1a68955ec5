"""`meft_fx.shard` in one process (a gloo group of one): its refusals, and a world of one trains as unsharded.
Two processes: tests/integration/test_fsdp.py."""
import pytest
import torch
import torch.distributed as dist

import architectures
import meft_fx
from ranks import free_port, trainable_grads

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def llama(dtype=torch.float64):
    arch = architectures.make("llama", dtype=dtype)
    torch.manual_seed(0)
    return meft_fx.convert(arch.model, meft_fx.MEFTConfig(verbose=False)).eval(), arch.make_inputs(2, 8)


def test_refused_before_the_process_group():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        meft_fx.shard(torch.nn.Linear(2, 2))


def test_refusals_name_the_argument_and_the_fix(group):
    with pytest.raises(ValueError, match="no reversible stack.*meft_fx.convert"):
        meft_fx.shard(torch.nn.Linear(2, 2))
    rev, _ = llama(torch.float32)
    with pytest.raises(ValueError, match="param_dtype=torch.bfloat16.*convert the model in bf16"):
        meft_fx.shard(rev, mp_policy=torch.distributed.fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    meft_fx.shard(rev)
    with pytest.raises(RuntimeError, match="already sharded"):
        meft_fx.shard(rev)


def test_a_world_of_one_gives_the_unsharded_gradients(group):
    rev, inputs = llama()
    rev(**inputs).loss.backward()
    want = trainable_grads(rev)
    rev, inputs = llama()
    meft_fx.shard(rev)
    rev(**inputs).loss.backward()
    got = trainable_grads(rev)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.slow
def test_a_half_serving_several_couplings_is_refused(group):
    arch = architectures.make("albert", dtype=torch.float32)
    rev = meft_fx.convert(arch.model, meft_fx.MEFTConfig(verbose=False))
    with pytest.raises(ValueError, match="share parameters with other halves.*fully_shard"):
        meft_fx.shard(rev)
