"""Multi-process training on CPU (gloo): DistributedDataParallel and FSDP2 over a converted model.

Two processes each take half of a batch; after DDP's all-reduce (FSDP2's reduce-scatter) the
gradient on every trainable parameter equals one process's gradient of the mean loss over the
whole batch. Tiny random BERT in float64, eval mode (no dropout) so the numbers are deterministic;
the backward is still the reversible one (it runs whenever grad is enabled). Rank 0's half has no
padding and rank 1's has, so the ranks run different captured call structures (variants).
"""
import functools
import os

import pytest
import torch
import torch.distributed as dist

import architectures
import meft_fx
from ranks import WORLD, part, run_ranks, trainable_grads

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")]

BATCH, SEQ = 4, 8
METHODS = ("meft1", "meft2", "meft3")


def build(method):
    arch = architectures.make("bert", dtype=torch.float64)
    torch.manual_seed(0)
    rev = meft_fx.convert(arch.model, meft_fx.MEFTConfig(method=method)).eval()
    return rev, arch.make_inputs(BATCH, SEQ)


def _body(rank, out_dir, results):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # DDP, every method, default find_unused_parameters=False; two iterations (a parameter that got
    # no gradient would make the second one fail: "Expected to have finished reduction ...").
    for method in METHODS:
        rev, inputs = build(method)
        ddp = DDP(rev)
        for _ in range(2):
            ddp.zero_grad(set_to_none=True)
            ddp(**part(inputs, rank)).loss.backward()
        results[f"ddp_{method}"] = trainable_grads(rev)

    # Then (meft3) train mode (dropout, RNG replay in the backward) with clipping and optimizer steps:
    # the ranks stay in sync, and save_adapters unwraps DDP.
    rev.train()
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        ddp(**part(inputs, rank)).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in ddp.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
    results["ddp_train_params"] = {n: p.detach().clone() for n, p in rev.named_parameters() if p.requires_grad}
    if rank == 0:
        meft_fx.save_adapters(ddp, os.path.join(out_dir, "adapters"))

    # FSDP2 on the whole converted model.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    rev, inputs = build("meft3")
    fully_shard(rev, mesh=mesh)
    for _ in range(2):
        rev.zero_grad(set_to_none=True)
        rev(**part(inputs, rank)).loss.backward()
    results["fsdp2_root"] = trainable_grads(rev)
    meft_fx.save_adapters(rev, os.path.join(out_dir, "fsdp_adapters"))  # collective; rank 0 writes

    # FSDP2 on a module the reversible programs never call (each Coupling) is refused with a clear error
    # (F and G sharded on their own is what meft_fx.shard does: tests/integration/test_fsdp.py).
    rev, inputs = build("meft3")
    for c in rev.bert.encoder.graph_module.meft_stack.couplings:
        fully_shard(c, mesh=mesh)
    fully_shard(rev, mesh=mesh)
    try:
        rev(**part(inputs, rank)).loss.backward()
        results["fsdp2_nested"] = "no error"
    except Exception as e:  # noqa: BLE001
        results["fsdp2_nested"] = f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return run_ranks(_body, out), out


@functools.lru_cache(maxsize=None)
def reference(method):
    rev, inputs = build(method)
    rev.zero_grad(set_to_none=True)
    rev(**inputs).loss.backward()
    return trainable_grads(rev)


def assert_same_grads(got, ref, what):
    assert set(got) == set(ref), what
    for name, g in ref.items():
        assert g is not None and got[name] is not None, f"{what}: {name} got no gradient"
        assert torch.allclose(got[name], g, rtol=1e-10, atol=1e-13), \
            f"{what}: {name} differs by {(got[name] - g).abs().max().item():.3g}"


@pytest.mark.parametrize("method", METHODS)
def test_ddp_gradients_equal_single_process(ranks, method):
    res, _ = ranks
    ref = reference(method)
    assert any(g.abs().max() > 0 for g in ref.values())
    for r in range(WORLD):
        assert_same_grads(res[r][f"ddp_{method}"], ref, f"DDP {method} rank {r}")


def test_ddp_training_steps_keep_ranks_in_sync_and_save(ranks):
    res, out = ranks
    a, b = res[0]["ddp_train_params"], res[1]["ddp_train_params"]
    assert set(a) == set(b)
    assert all(torch.equal(a[n], b[n]) for n in a)
    fresh, inputs = build("meft3")
    meft_fx.load_adapters(fresh, out / "adapters")  # saved through the DDP wrapper
    assert all(torch.equal(p, a[n]) for n, p in fresh.named_parameters() if p.requires_grad)


def test_fsdp2_whole_model_gradients_equal_single_process(ranks):
    res, out = ranks
    ref = reference("meft3")
    for r in range(WORLD):
        assert_same_grads(res[r]["fsdp2_root"], ref, f"FSDP2 rank {r}")
    # save_adapters gathers the shards: the file holds whole tensors that load into an unsharded model
    fresh, _ = build("meft3")
    want = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    meft_fx.load_adapters(fresh, out / "fsdp_adapters")
    assert all(torch.equal(p, want[n]) for n, p in fresh.named_parameters() if p.requires_grad)


def test_fsdp2_on_a_coupling_is_refused(ranks):
    res, _ = ranks
    for r in range(WORLD):
        msg = res[r]["fsdp2_nested"]
        assert "fully_shard" in msg and "meft_fx.shard" in msg and "Coupling" in msg, msg
