"""The benchmark's models: an encoder classifier (BERT) and decoder LMs (LLaMA, Mixtral), random init, with a batch.

    bert     BertForSequenceClassification: heads = hidden / 64 unless given, intermediate 4·hidden
             unless given, labels = one class per sequence; LoRA on query, value.
    llama    LlamaForCausalLM: heads = hidden / 64 unless given, kv heads = heads unless given,
             intermediate 8/3·hidden rounded up to a multiple of 32 unless given, labels = input_ids
             (the model shifts them); LoRA on q_proj, v_proj.
    mixtral  MixtralForCausalLM: as llama, with `experts` routed experts of that intermediate size
             per layer, `top_k` of them per token (transformers' grouped experts).

The LoRA baselines use r=8, alpha 16 and dropout `lora_dropout` (0.1 unless given).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHS = ("bert", "llama", "mixtral")
_CLASSES = {"bert": "BertForSequenceClassification", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


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
        return (f"{_CLASSES[self.arch]}, random init, hidden {self.hidden}, heads {self.num_heads}{kv}, intermediate "
                f"{self.intermediate_size}{moe}, vocab {self.vocab}")

    def config(self, depth: int, seq: int):
        import transformers as tf

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
        return getattr(tf, _CLASSES[self.arch])(config).to(device=device, dtype=dtype).train()

    def batch(self, config, batch: int, seq: int, device, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed + 1)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        labels = ids if self.decoder else torch.randint(0, config.num_labels, (batch,), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, seq, dtype=torch.long).to(device),
                "labels": labels.to(device)}


def liger_chunk_bytes(tokens: int, hidden: int, vocab: int, itemsize: int = 4) -> int:
    """Liger's fused-linear-cross-entropy chunk as bytes of logits: ⌈vocab / hidden⌉ chunks' worth, i.e.
    next power of two of ⌈tokens / ⌈vocab / hidden⌉⌉ tokens per chunk."""
    chunks = -(-vocab // hidden)
    rows = 1 << max(0, (-(-tokens // chunks) - 1).bit_length())
    return rows * vocab * itemsize
