"""The benchmark's models: an encoder classifier (BERT) and decoder LMs (LLaMA, Mixtral), random init, with a batch.

    bert     BertForSequenceClassification: heads = hidden / 64 unless given, intermediate 4·hidden
             unless given, labels = one class per sequence; LoRA on query, value.
    llama    LlamaForCausalLM: heads = hidden / 64 unless given, kv heads = heads unless given,
             intermediate 8/3·hidden rounded up to a multiple of 32 unless given, labels = input_ids
             (the model shifts them); LoRA on q_proj, v_proj.
    mixtral  MixtralForCausalLM: as llama, with `experts` routed experts of that intermediate size
             per layer, `top_k` of them per token (transformers' grouped experts).
    smollm2  the real pretrained SmolLM2-135M-Instruct (`meft_fx.pretrained.smollm2`; LLaMA, hidden 576,
             9 heads / 3 kv heads, intermediate 1536, vocabulary 49152; depth = its first `depth` of 30
             layers), the batch real English (`meft_fx.pretrained.prose`, repeated), labels = input_ids.

The LoRA baselines use r=8, alpha 16 and dropout `lora_dropout` (0.1 unless given). meft_fx converts a random-init
model with λ = β = 2^-`scale_bits` (default 5: what convert measures on SmolLM2): random weights have no starting
point to measure (their next-token distributions are near uniform, so every scale looks close); the real model's
scale is measured by convert (`scale_bits` None).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHS = ("bert", "llama", "mixtral", "smollm2")
_CLASSES = {"bert": "BertForSequenceClassification", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
            "smollm2": "LlamaForCausalLM"}
#: meft_fx's scale on random-init models (see the module docstring).
RANDOM_SCALE_BITS = 5


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model shape. `config(depth, seq)` builds its transformers config."""

    arch: str
    hidden: int
    vocab: int
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    #: the LoRA baselines' dropout on the adapted layers' inputs (PEFT's own default is 0.0)
    lora_dropout: float = 0.1
    #: mixtral: routed experts per layer, and how many of them each token goes to
    experts: int = 8
    top_k: int = 2

    @classmethod
    def smollm2(cls, lora_dropout: float = 0.1) -> "BenchModel":
        """The real SmolLM2-135M-Instruct's shape (its weights are loaded by `build`)."""
        return cls("smollm2", 576, 49152, heads=9, kv_heads=3, intermediate=1536, lora_dropout=lora_dropout)

    @property
    def pretrained(self) -> bool:
        """Real weights (the scale is measured by convert), not a random init."""
        return self.arch == "smollm2"

    @property
    def scale_bits(self) -> int | None:
        """The MEFTConfig.scale_bits the bench converts with (None: measured)."""
        return None if self.pretrained else RANDOM_SCALE_BITS

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1) (the LoRA baselines' dropout "
                             "probability; PEFT's default is 0.0)")
        if self.hidden % self.num_heads:
            raise ValueError(f"heads={self.num_heads} must divide hidden={self.hidden}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"kv_heads={self.num_kv_heads} must divide heads={self.num_heads}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, experts={self.experts}] (experts each token goes to)")

    @property
    def decoder(self) -> bool:
        """A causal LM (labels = input_ids), not the encoder classifier."""
        return self.arch != "bert"

    @property
    def num_heads(self) -> int:
        if self.heads:
            return self.heads
        heads = max(1, round(self.hidden / 64))
        while self.hidden % heads:
            heads -= 1
        return heads

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.num_heads

    @property
    def intermediate_size(self) -> int:
        if self.intermediate:
            return self.intermediate
        return 4 * self.hidden if self.arch == "bert" else -(-8 * self.hidden // 3 // 32) * 32

    @property
    def lora_targets(self) -> list[str]:
        return ["q_proj", "v_proj"] if self.decoder else ["query", "value"]

    @property
    def lora_task(self) -> str:
        return "CAUSAL_LM" if self.decoder else "SEQ_CLS"

    @property
    def title(self) -> str:
        kv = f" / {self.num_kv_heads} kv heads" if self.decoder else ""
        moe = f", {self.experts} experts, top-{self.top_k}" if self.arch == "mixtral" else ""
        if self.pretrained:
            return (f"SmolLM2-135M-Instruct (pretrained, LlamaForCausalLM), hidden {self.hidden}, heads "
                    f"{self.num_heads}{kv}, intermediate {self.intermediate_size}, vocab {self.vocab}")
        return (f"{_CLASSES[self.arch]}, random init, hidden {self.hidden}, heads {self.num_heads}{kv}, intermediate "
                f"{self.intermediate_size}{moe}, vocab {self.vocab}")

    def config(self, depth: int, seq: int):
        import transformers as tf

        if self.pretrained:
            from .. import pretrained

            cfg = pretrained.smollm2_config()
            if not 1 <= depth <= cfg.num_hidden_layers:
                raise ValueError(f"depth {depth}: SmolLM2-135M-Instruct has {cfg.num_hidden_layers} layers")
            cfg.num_hidden_layers = depth
            return cfg

        common = dict(hidden_size=self.hidden, num_hidden_layers=depth, num_attention_heads=self.num_heads,
                      intermediate_size=self.intermediate_size, vocab_size=self.vocab,
                      max_position_embeddings=max(512, seq))
        if self.arch == "bert":
            return tf.BertConfig(num_labels=2, **common)
        if self.arch == "mixtral":
            return tf.MixtralConfig(num_key_value_heads=self.num_kv_heads, use_cache=False, num_local_experts=self.experts,
                                    num_experts_per_tok=self.top_k, **common)
        return tf.LlamaConfig(num_key_value_heads=self.num_kv_heads, use_cache=False, **common)

    def build(self, config, dtype: torch.dtype, device, seed: int):
        import transformers as tf

        torch.manual_seed(seed)
        if self.pretrained:
            from .. import pretrained

            return pretrained.smollm2(dtype, layers=config.num_hidden_layers)[0].to(device).train()
        return getattr(tf, _CLASSES[self.arch])(config).to(device=device, dtype=dtype).train()

    def batch(self, config, batch: int, seq: int, device, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed + 1)
        ids = _prose_ids(batch, seq) if self.pretrained else torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        labels = ids if self.decoder else torch.randint(0, config.num_labels, (batch,), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, seq, dtype=torch.long).to(device),
                "labels": labels.to(device)}


def _prose_ids(batch: int, seq: int) -> torch.Tensor:
    """(batch, seq) token ids of SmolLM2's tokenizer: the prose paragraphs, repeated, each row from another one."""
    from .. import pretrained

    tok = pretrained.smollm2_tokenizer()
    paras = [tok(p, add_special_tokens=False)["input_ids"] for p in pretrained.prose()]
    rows = []
    for b in range(batch):
        ids: list = []
        i = b
        while len(ids) < seq:
            ids += paras[i % len(paras)]
            i += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def liger_chunk_bytes(tokens: int, hidden: int, vocab: int, itemsize: int = 4) -> int:
    """Liger's fused-linear-cross-entropy chunk as bytes of logits: ⌈vocab / hidden⌉ chunks' worth, i.e.
    next power of two of ⌈tokens / ⌈vocab / hidden⌉⌉ tokens per chunk."""
    chunks = -(-vocab // hidden)
    rows = 1 << max(0, (-(-tokens // chunks) - 1).bit_length())
    return rows * vocab * itemsize
