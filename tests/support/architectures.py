"""Tiny random models of real architectures (and two hand-written transformers) for tests.

`make(name)` returns an `Arch`: a freshly initialised model in train() mode (dropout 0.1 really on)
and `make_inputs(batch, seq)`, a deterministic kwargs dict for `model(**kwargs)` that includes labels,
so `model(**inputs).loss` exists (except T5EncoderModel, which has no head: it returns a
BaseModelOutput and its inputs have no labels).

Inputs: token ids are drawn from [3, vocab) so no special token appears by chance; when batch > 1 and
seq >= 4 the last row is right-padded by seq // 4 tokens (attention_mask 0, pad id, labels -100), so
masks are real data, not all ones. Right padding leaves no query row fully masked. BART's decoder
length is seq // 2 + 1, different from the encoder's, so an exported graph keeps two sequence symbols.
ViT ignores `seq`: its sequence is fixed by the image (16x16, patch 4: 16 patches + CLS = 17 tokens).

The hand-written models return a plain dict: {"logits": ...} plus {"loss": scalar} when labels are given.
  PreNormTransformer  (prenorm_custom):  causal LM, logits (batch, seq, vocab), next-token cross entropy.
  PostNormTransformer (postnorm_custom): classifier, logits (batch, num_labels), mean-pooled over the mask.
Both trace with torch.export and with torch.fx.symbolic_trace (no data-dependent control flow; the only
branches are `is None` tests on arguments, so symbolic_trace needs every argument as a Proxy or
`concrete_args` for the ones left out). The pre-norm model's layers are children of the root (the
module owning the stack is the model itself); the post-norm model keeps them in its `encoder` submodule.

Quirks worth knowing when using these:
- HF causal-LM losses (gpt2, llama, opt) upcast logits with `.float()`: their loss is float32 even for a
  float64 model, so the gradient reaching the logits is rounded to float32. BERT/RoBERTa/ViT/BART and the
  hand-written models keep float64 end to end.
- torch.export duck-sizes: input dims with equal sizes get one symbol, so export with batch != seq.
- HF attention is aten.scaled_dot_product_attention with dropout_p=0.1 inside it in train mode (no separate
  dropout op for attention probabilities); the hand-written models use softmax + nn.Dropout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ["bert", "roberta", "gpt2", "llama", "opt", "t5_encoder", "vit", "bart",
                 "prenorm_custom", "postnorm_custom"]

#: Architectures whose layers have another shape (issue 15): parallel residual (GPT-NeoX, GPT-J, Falcon),
#: routed experts (Mixtral; float64 needs its "batched_mm" experts, grouped_mm takes fp32/bf16 only),
#: relative-position attention (DeBERTa-v2), one layer called N times (ALBERT). Tested in test_breadth.
MORE_ARCHITECTURES = ["gpt_neox", "gptj", "falcon", "mixtral", "deberta_v2", "albert"]
#: what each of them is, for the README / messages
LAYER_KINDS = {"gpt_neox": "parallel", "gptj": "parallel", "falcon": "parallel", "mixtral": "moe",
               "deberta_v2": "relative", "albert": "shared"}

VOCAB = 100
MAX_POSITIONS = 128
NUM_LABELS = 3
DROPOUT = 0.1
IMAGE_SIZE, PATCH_SIZE = 16, 4


@dataclass
class Arch:
    name: str
    model: torch.nn.Module
    num_layers: int  # transformer layers per stack
    num_stacks: int  # 2 for bart (encoder + decoder), 1 otherwise
    make_inputs: Callable[[int, int], dict]
    hf: bool


# ----------------------------------------------------------------------------- hand-written models

NEG = -1e9  # masked score: finite, so even a fully masked row gives no NaN (fp32/fp64)


class SelfAttention(nn.Module):
    def __init__(self, hidden, heads, dropout, causal):
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, hidden // heads, causal
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x, attention_mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5  # (batch, heads, query, key)
        if self.causal:
            i = torch.arange(x.shape[1], device=x.device)
            future = i[None, :] > i[:, None]  # (query, key): key after query
            scores = scores.masked_fill(future, NEG)
        if attention_mask is not None:  # (batch, key): 1 keep, 0 padding
            scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, NEG)
        probs = self.attn_drop(scores.softmax(-1))
        return self.out((probs @ v).transpose(1, 2).flatten(2))


class MLP(nn.Sequential):
    def __init__(self, hidden, intermediate, dropout):
        super().__init__(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden), nn.Dropout(dropout))


class PreNormBlock(nn.Module):
    causal = True  # the pre-norm model is a causal LM, the post-norm one a bidirectional classifier

    def __init__(self, hidden, heads, intermediate, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, dropout, causal=self.causal)
        self.drop = nn.Dropout(dropout)
        self.mlp = MLP(hidden, intermediate, dropout)

    def forward(self, x, attention_mask=None):
        x = x + self.drop(self.attn(self.ln1(x), attention_mask))
        return x + self.mlp(self.ln2(x))


class PostNormBlock(PreNormBlock):
    causal = False

    def forward(self, x, attention_mask=None):
        x = self.ln1(x + self.drop(self.attn(x, attention_mask)))
        return self.ln2(x + self.mlp(x))


class Encoder(nn.Module):
    """Token embedding + learned positions + dropout, then the blocks."""

    def __init__(self, block, vocab_size=VOCAB, hidden=32, heads=4, intermediate=64, num_layers=2,
                 max_positions=MAX_POSITIONS, dropout=DROPOUT):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(max_positions, hidden)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(block(hidden, heads, intermediate, dropout) for _ in range(num_layers))

    def forward(self, input_ids, attention_mask=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.embed(input_ids) + self.pos(positions))
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


class PreNormTransformer(Encoder):
    """Causal LM: x = x + attn(LN(x)); x = x + mlp(LN(x)); final LN; LM head; next-token loss.

    The layers are direct children of the root (nanoGPT style): the module owning the stack is the model."""

    def __init__(self, vocab_size=VOCAB, hidden=32, **kw):
        super().__init__(PreNormBlock, vocab_size, hidden, **kw)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lm_head(self.norm(super().forward(input_ids, attention_mask)))
        out = {"logits": logits}
        if labels is not None:  # labels[t] is the target of position t - 1 (as in HF); -100 is ignored
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return out


class PostNormTransformer(nn.Module):
    """Classifier: x = LN(x + attn(x)); x = LN(x + mlp(x)); masked mean pool; linear head; cross entropy.

    The stack lives in the `encoder` submodule, the head at the root."""

    def __init__(self, vocab_size=VOCAB, hidden=32, num_labels=NUM_LABELS, dropout=DROPOUT, **kw):
        super().__init__()
        self.encoder = Encoder(PostNormBlock, vocab_size, hidden, dropout=dropout, **kw)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.encoder(input_ids, attention_mask)
        if attention_mask is None:
            pooled = x.mean(1)
        else:
            m = attention_mask[:, :, None].to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1)
        out = {"logits": self.classifier(self.drop(pooled))}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"], labels)
        return out


# ----------------------------------------------------------------------------- inputs

def _token_inputs(seed, batch, seq, *, vocab=VOCAB, pad_id=0, labels="lm", decoder=False):
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + seq)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq >= 4:
        mask[-1, seq - seq // 4:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels == "lm":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif labels == "cls":
        out["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    if decoder:  # encoder-decoder: decoder of a different length
        dec = seq // 2 + 1
        out["decoder_input_ids"] = torch.randint(3, vocab, (batch, dec), generator=g)
        out["labels"] = torch.randint(3, vocab, (batch, dec), generator=g)
    return out


# ----------------------------------------------------------------------------- HF configs

def _hf(name, num_layers, hidden):
    import transformers as tf

    heads, inter, p = 4, 2 * hidden, DROPOUT
    common = dict(vocab_size=VOCAB, attn_implementation="sdpa")
    if name in ("bert", "roberta"):
        cfg_cls, model_cls = ((tf.BertConfig, tf.BertForSequenceClassification) if name == "bert"
                              else (tf.RobertaConfig, tf.RobertaForSequenceClassification))
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2) if name == "bert" else \
            dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
        cfg = cfg_cls(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                      intermediate_size=inter, hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                      # RoBERTa positions start at pad_token_id + 1
                      max_position_embeddings=MAX_POSITIONS + (2 if name == "roberta" else 0),
                      num_labels=NUM_LABELS, problem_type="single_label_classification", **ids, **common)
        return model_cls(cfg), ids["pad_token_id"], "cls"
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=heads, n_inner=inter, n_positions=MAX_POSITIONS,
                            resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, use_cache=False,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
        model = tf.GPT2LMHeadModel(cfg)
        model.loss_type = "ForCausalLM"  # class name has no known loss suffix; avoids a warning
        return model, 0, "lm"
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                             num_key_value_heads=2, intermediate_size=inter, max_position_embeddings=MAX_POSITIONS,
                             attention_dropout=p, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             **common)
        return tf.LlamaForCausalLM(cfg), 0, "lm"
    if name == "opt":
        cfg = tf.OPTConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads, ffn_dim=inter,
                           word_embed_proj_dim=hidden, max_position_embeddings=MAX_POSITIONS, dropout=p,
                           attention_dropout=p, use_cache=False, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                           **common)
        return tf.OPTForCausalLM(cfg), 1, "lm"
    if name == "t5_encoder":
        cfg = tf.T5Config(d_model=hidden, d_kv=hidden // heads, d_ff=inter, num_layers=num_layers, num_heads=heads,
                          dropout_rate=p, use_cache=False, is_encoder_decoder=False, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0, **common)
        return tf.T5EncoderModel(cfg), 0, None
    if name == "vit":
        cfg = tf.ViTConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                           intermediate_size=inter, hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                           image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, num_labels=NUM_LABELS,
                           problem_type="single_label_classification", attn_implementation="sdpa")
        return tf.ViTForImageClassification(cfg), None, None
    if name == "bart":
        cfg = tf.BartConfig(d_model=hidden, encoder_layers=num_layers, decoder_layers=num_layers,
                            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=inter,
                            decoder_ffn_dim=inter, max_position_embeddings=MAX_POSITIONS, dropout=p,
                            attention_dropout=p, activation_dropout=p, use_cache=False, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                            **common)
        return tf.BartForConditionalGeneration(cfg), 1, None
    return _hf_more(tf, name, num_layers, hidden, heads, inter, p, common)


def _hf_more(tf, name, num_layers, hidden, heads, inter, p, common):
    """The MORE_ARCHITECTURES models: (model, pad id, labels kind)."""
    decoder = dict(max_position_embeddings=MAX_POSITIONS, use_cache=False, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, **common)
    if name == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                               intermediate_size=inter, use_parallel_residual=True, attention_dropout=p,
                               hidden_dropout=p, **decoder)
        return tf.GPTNeoXForCausalLM(cfg), 0, "lm"
    if name == "gptj":
        decoder["n_positions"] = decoder.pop("max_position_embeddings")
        cfg = tf.GPTJConfig(n_embd=hidden, n_layer=num_layers, n_head=heads, n_inner=inter, rotary_dim=4,
                            resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **decoder)
        return tf.GPTJForCausalLM(cfg), 0, "lm"
    if name == "falcon":
        cfg = tf.FalconConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                              parallel_attn=True, new_decoder_architecture=False, attention_dropout=p,
                              hidden_dropout=p, **decoder)
        return tf.FalconForCausalLM(cfg), 0, "lm"
    if name == "mixtral":
        cfg = tf.MixtralConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                               num_key_value_heads=2, intermediate_size=inter, num_local_experts=4,
                               num_experts_per_tok=2, attention_dropout=p, experts_implementation="batched_mm",
                               **decoder)
        return tf.MixtralForCausalLM(cfg), 0, "lm"
    if name == "deberta_v2":
        cfg = tf.DebertaV2Config(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                                 intermediate_size=inter, hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                                 max_position_embeddings=MAX_POSITIONS, relative_attention=True, position_buckets=16,
                                 pos_att_type=["p2c", "c2p"], num_labels=NUM_LABELS, pad_token_id=0,
                                 # without a problem type its loss branches on the labels' values (nonzero)
                                 problem_type="single_label_classification", vocab_size=VOCAB)
        return tf.DebertaV2ForSequenceClassification(cfg), 0, "cls"
    if name == "albert":
        cfg = tf.AlbertConfig(hidden_size=hidden, embedding_size=16, num_hidden_layers=num_layers,
                              num_attention_heads=heads, intermediate_size=inter, hidden_dropout_prob=p,
                              attention_probs_dropout_prob=p, max_position_embeddings=MAX_POSITIONS,
                              num_labels=NUM_LABELS, pad_token_id=0, **common)
        return tf.AlbertForSequenceClassification(cfg), 0, "cls"
    raise ValueError(f"unknown architecture {name!r}; known: {ARCHITECTURES + MORE_ARCHITECTURES}")


# ----------------------------------------------------------------------------- make

def make(name: str, *, dtype=torch.float32, num_layers: int = 2, hidden: int = 32, seed: int = 0) -> Arch:
    """A fresh tiny random `name` model (train mode, `dtype`) with its input factory."""
    if name not in ARCHITECTURES + MORE_ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {ARCHITECTURES + MORE_ARCHITECTURES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "prenorm_custom":
            model, pad_id, labels, hf = PreNormTransformer(hidden=hidden, intermediate=2 * hidden,
                                                           num_layers=num_layers), 0, "lm", False
        elif name == "postnorm_custom":
            model, pad_id, labels, hf = PostNormTransformer(hidden=hidden, intermediate=2 * hidden,
                                                            num_layers=num_layers), 0, "cls", False
        else:
            (model, pad_id, labels), hf = _hf(name, num_layers, hidden), True
    model = model.to(dtype).train()

    if name == "vit":
        def make_inputs(batch, seq):  # seq is ignored: 17 tokens fixed by the image size
            g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009)
            return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype),
                    "labels": torch.randint(0, NUM_LABELS, (batch,), generator=g)}
    else:
        def make_inputs(batch, seq):
            return _token_inputs(seed, batch, seq, pad_id=pad_id, labels=labels, decoder=name == "bart")

    return Arch(name, model, num_layers, 2 if name == "bart" else 1, make_inputs, hf)


def tiny_decoder(family: str, **extra) -> torch.nn.Module:
    """A 2-layer causal LM of a transformers family ("Llama", "Gemma", "Phi3", "Granite", ...): hidden 32,
    FFN 64, 4 heads / 2 kv heads, vocabulary 128, fp64, seeded; `extra` goes to its config."""
    import transformers as tf

    cfg = getattr(tf, f"{family}Config")(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False, **extra)
    torch.manual_seed(0)
    return getattr(tf, f"{family}ForCausalLM")(cfg).double()
