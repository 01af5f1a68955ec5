"""Fine-tuning a decoder on `meft_fx.bench.tasks.SentimentChat` with meft_fx or PEFT LoRA, the same budget for all.

    prepare(method, model)      meft_fx.convert (the default config) or LoRA r = 8 on q/v or on every linear layer
    train(model, task, ...)     AdamW, linear warm-up then decay, clipping at 1.0, a progress bar, seeded batches
    step_memory(model, batch)   activation MiB of one training step (`meft_fx.memory.measure_step_memory`)

Used by the main job (`examples/finetune_smollm2.py`) and the quality benchmark (`meft_fx.bench.quality`).
"""
from __future__ import annotations

import random
import statistics
import sys
import time

import torch

from ..memory import MiB, measure_step_memory

__all__ = ["METHODS", "LORA_TARGETS", "prepare", "train", "batches_of", "step_memory"]

#: The methods: meft_fx's default conversion, LoRA (r = 8, alpha 16, dropout 0.1) on q/v, and on all linear layers.
METHODS = ("meft", "lora_qv", "lora_all")
LORA_TARGETS = {"lora_qv": ["q_proj", "v_proj"],
                "lora_all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def prepare(method: str, model, config=None, checkpointing: bool = False):
    """`model` made trainable by `method` (it is changed: pass a fresh copy). `config`: meft's MEFTConfig
    (default: the default); `checkpointing`: LoRA with HF gradient checkpointing (non-reentrant)."""
    if method == "meft":
        import meft_fx

        return meft_fx.convert(model, config or meft_fx.MEFTConfig(verbose=False, inplace=True))
    if method not in LORA_TARGETS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    from peft import LoraConfig, get_peft_model

    if checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS[method])
    return get_peft_model(model, cfg)


def batches_of(n: int, steps: int, batch_size: int, seed: int) -> list:
    """`steps` lists of `batch_size` indices into n examples, epochs reshuffled by a seeded generator: the same
    batches, in the same order, for every method."""
    rng, out, pool = random.Random(seed), [], []
    while len(out) < steps:
        if len(pool) < batch_size:
            extra = list(range(n))
            rng.shuffle(extra)
            pool += extra
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


def _schedule(steps: int, warmup: float):
    w = max(1, int(round(warmup * steps)))
    return lambda s: (s + 1) / w if s < w else max(0.0, (steps - s) / max(1, steps - w))


def train(model, make_batch, pairs, *, steps: int, batch_size: int, lr: float, seed: int = 0, warmup: float = 0.1,
          weight_decay: float = 0.0, desc: str = "train", progress: bool = True) -> dict:
    """Train the trainable parameters of `model` on `make_batch(some pairs)` (a dict of the model's keyword
    arguments, with labels; e.g. `SentimentChat.batch`); returns {"losses", "step_s" (median seconds per step)}.
    The batches: `batches_of(len(pairs), steps, batch_size, seed)`. A tqdm bar on stderr when `progress`."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameter")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup))
    torch.manual_seed(seed)  # the same dropout stream for every method
    model.train()
    losses, times = [], []
    bar = tqdm(batches_of(len(pairs), steps, batch_size, seed), desc=desc, unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not progress)
    for idx in bar:
        batch = make_batch([pairs[i] for i in idx])
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
    model.eval()
    return {"losses": losses, "step_s": statistics.median(times)}


def step_memory(model, batch: dict, seed: int = 0) -> float:
    """Activation MiB of one training step of `model` on `batch` (peak minus what the step leaves), after one
    untimed step that creates the gradient buffers; gradients are zeroed after."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step():
        model(**batch).loss.backward()

    torch.manual_seed(seed)
    step()
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
    torch.manual_seed(seed)
    mem = measure_step_memory(step, torch.device("cpu"))
    for p in params:
        p.grad = None
    return mem.activation_bytes / MiB
