"""Activation memory and step time of MEFT against full fine-tuning, LoRA and their usual remedies.

    python -m meft_fx.bench --hidden 384 --depths 6,12,24 --seqs 256,512 --batch 8 --out results/
    python -m meft_fx.bench --arch llama --hidden 512 --intermediate 1376 --heads 8 --kv-heads 4 \
        --vocab 32000 --depths 8,24 --seqs 512 --batch 2 --methods decoder

For every (depth, sequence length) one randomly initialised model (`--arch`: bert =
BertForSequenceClassification, llama = LlamaForCausalLM with labels = input_ids, mixtral =
MixtralForCausalLM likewise, `--experts` routed experts per layer, `--top-k` per token; built under a
fixed seed, dropout on where the model has it, labels given) and one batch are shared by all
methods; each method gets a fresh copy of the model. Per method:

    full             full fine-tuning, every parameter trainable
    lora             peft LoRA, r=8 on the attention query/value projections, a task head trainable
    lora_ckpt        lora + HF gradient checkpointing (non-reentrant)
    lora_ckpt_chunked  lora_ckpt + the head's cross-entropy in chunks of tokens (meft_fx.chunk_loss
                     mode="tokens" with Liger's chunk rule: ⌈vocab / hidden⌉ chunks' worth of tokens, a
                     power of two); decoders only, not part of "all"
    lora_ckpt_chunked_vocab  lora_ckpt + meft_fx's own chunked loss (mode="vocab", 4 MiB blocks:
                     what MEFTConfig.chunk_loss does); decoders only, not part of "all"
    compile_budget0  full fine-tuning under torch.compile with
                     torch._functorch.config.activation_memory_budget = 0 (maximal recomputation)
    meft{1,2,3}_{float,exact}   meft_fx.convert(model, MEFTConfig(method=..., numerics=...))
    meft{1,2,3}_{float,exact}_compiled   the same, then meft_fx.compile (inductor, dynamic shapes);
                     not part of "all": ask for them by name or as "compiled" (the six)
    meft{1,2,3}_{float,exact}_nochunk    MEFTConfig(chunk_loss=False): the model's own head and loss;
                     not part of "all" ("decoder" = lora, lora_ckpt, lora_ckpt_chunked, meft3_exact,
                     meft3_exact_nochunk, meft3_float)

A step is forward + loss + backward (no optimizer). One untimed step runs first (it compiles /
captures and creates the .grad buffers), gradients are then zeroed in place, and the next step is
measured with `meft_fx.memory.measure_step_memory`: activation memory = peak live bytes during the
step minus the bytes it leaves behind. "saved" is measured separately: the bytes a forward leaves
alive for its backward. Step time is the median over `--repeats` steps, each
preceded by an in-place zero of the gradients; the methods of one (depth, seq) are timed in turn
(after all their memory measurements: every model stays alive until then), so a change in the
machine's load slows all alike, each round in the next of `meft_fx.memory.balanced_orders`, so that
every method follows every other equally often (what one step leaves behind — a grown heap, warm
caches — changes the next one's time by several per cent; with `--repeats` a multiple of the number
of methods, twice it when that is odd, the orders are fully balanced) (`--no-alternate`: each method
timed right after its
memory, one model alive at a time). Compiled methods are always timed on their own.

A method that cannot run (meft_fx.convert missing or raising, inductor unavailable, ...) is
recorded as "unavailable: <reason>" and the benchmark carries on.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import warnings
from typing import Iterable, Sequence

import torch

from ..memory import MiB, alternating_times, measure_step_memory, median_step_time, paired_ratio
from .models import ARCHS, BenchModel, liger_chunk_bytes

BASELINES = ("full", "lora", "lora_ckpt", "compile_budget0")
CHUNKED_BASELINES = ("lora_ckpt_chunked", "lora_ckpt_chunked_vocab")  # decoders: opt-in
MEFT_METHODS = tuple(f"meft{k}_{n}" for k in (1, 2, 3) for n in ("float", "exact"))
ALL_METHODS = BASELINES + MEFT_METHODS
COMPILED_METHODS = tuple(f"{m}_compiled" for m in MEFT_METHODS)  # opt-in: not in ALL_METHODS
NOCHUNK_METHODS = tuple(f"{m}_nochunk" for m in MEFT_METHODS)  # opt-in
DECODER_METHODS = ("lora", "lora_ckpt", "lora_ckpt_chunked", "lora_ckpt_chunked_vocab", "meft3_exact",
                   "meft3_exact_nochunk", "meft3_float")
OPT_IN = COMPILED_METHODS + NOCHUNK_METHODS + CHUNKED_BASELINES
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
LORA_RANK = 8
SEED = 0

__all__ = ["run_benchmark", "expand_methods", "format_table", "plot_memory", "bert_config", "main", "ALL_METHODS"]


class Unavailable(Exception):
    """A method cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# models and batches


def bert_config(hidden: int, depth: int, vocab: int = 30522, max_seq: int = 512, num_labels: int = 2):
    """BertConfig of the given width and depth (heads = hidden/64 rounded, intermediate = 4·hidden)."""
    cfg = BenchModel("bert", hidden, vocab).config(depth, max_seq)
    cfg.num_labels = num_labels
    return cfg


# ---------------------------------------------------------------------------------------------
# methods: each turns a fresh model into (callable, trainable parameters, note)


def _lora(model, spec: BenchModel, checkpointing: bool):
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as e:
        raise Unavailable(f"peft is not installed ({e})") from e
    with warnings.catch_warnings():  # transformers 5 deprecation notices for the gradient_checkpointing_* names
        warnings.simplefilter("ignore", FutureWarning)
        if checkpointing:
            if hasattr(model.config, "use_cache"):
                model.config.use_cache = False
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5: the new name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cfg = LoraConfig(task_type=getattr(TaskType, spec.lora_task), r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                         lora_dropout=spec.lora_dropout, target_modules=spec.lora_targets)
        peft_model = get_peft_model(model, cfg)
    head = "; classifier trainable" if spec.arch == "bert" else ""
    return peft_model, f"LoRA r=8 on {','.join(spec.lora_targets)}, dropout {spec.lora_dropout:g}{head}" + (
        "; gradient checkpointing (non-reentrant)" if checkpointing else "")


def _chunked(peft_model, note: str, spec: BenchModel, batch: dict, vocab_blocks: bool):
    import meft_fx

    base = peft_model.get_base_model()
    inputs = {k: v[:1, :8] if v.dim() == 2 else v[:1] for k, v in batch.items()}
    if vocab_blocks:
        meft_fx.chunk_loss(base, example_inputs=inputs)
        return peft_model, note + "; meft_fx's chunked loss (vocabulary blocks, 4 MiB)"
    chunk = liger_chunk_bytes(batch["input_ids"].numel(), spec.hidden, spec.vocab)
    meft_fx.chunk_loss(base, example_inputs=inputs, chunk_bytes=chunk, mode="tokens")
    return peft_model, note + f"; chunked loss ({chunk // (spec.vocab * 4)} tokens per chunk, Liger's rule)"


def _compile(model):
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the torch build
        raise Unavailable(f"inductor unavailable ({type(e).__name__}: {e})") from e
    if not hasattr(functorch_config, "activation_memory_budget"):
        raise Unavailable("torch._functorch.config.activation_memory_budget does not exist in this torch")
    return torch.compile(model), "full fine-tuning, torch.compile (inductor), activation_memory_budget=0"


def _meft(model, method: str, example_inputs: dict, spec: BenchModel):
    meft, numerics, *rest = method.split("_")
    chunk = "nochunk" not in rest
    try:
        import meft_fx
        convert, MEFTConfig = meft_fx.convert, meft_fx.MEFTConfig
    except Exception as e:
        raise Unavailable(f"meft_fx.convert is not importable ({type(e).__name__}: {e})") from e
    try:
        exact = numerics == "exact"
        cfg = MEFTConfig(method=meft, numerics=numerics, chunk_loss=chunk, scale_bits=spec.scale_bits if exact else None)
        converted = convert(model, cfg, example_inputs=None if spec.pretrained else dict(example_inputs))
    except Exception as e:
        raise Unavailable(f"convert raised {type(e).__name__}: {_short(e)}") from e
    k = converted.meft_config.scale_bits
    scale = ("" if k is None else f", k = {k}" + (" (measured)" if spec.pretrained else " (fixed)"))
    return converted, (f"meft_fx.convert(method={meft!r}, numerics={numerics!r}{'' if chunk else ', chunk_loss=False'})"
                       + scale)


def prepare(method: str, model, batch: dict, spec: BenchModel | None = None):
    """(callable model, note) for `method`, built from the fresh `model` (of `spec`, default BERT)."""
    spec = spec or BenchModel("bert", model.config.hidden_size, model.config.vocab_size)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, "all parameters trainable"
    if method == "lora":
        return _lora(model, spec, checkpointing=False)
    if method == "lora_ckpt":
        return _lora(model, spec, checkpointing=True)
    if method in CHUNKED_BASELINES:
        return _chunked(*_lora(model, spec, checkpointing=True), spec, batch, method.endswith("_vocab"))
    if method == "compile_budget0":
        return _compile(model)
    if method in MEFT_METHODS or method in NOCHUNK_METHODS:
        return _meft(model, method, batch, spec)
    if method in COMPILED_METHODS:
        converted, note = _meft(model, method[: -len("_compiled")], batch, spec)
        import meft_fx

        return meft_fx.compile(converted), note + " + meft_fx.compile (inductor, dynamic shapes)"
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS + OPT_IN)}")


def _short(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


@contextlib.contextmanager
def _time_limit(seconds: float | None, what: str):
    """Raise Unavailable in the main thread if the block runs longer than `seconds` (Unix only)."""
    usable = (seconds and seconds > 0 and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise Unavailable(f"{what} exceeded the time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _method_context(method: str):
    if method in COMPILED_METHODS:
        try:
            yield
        finally:
            torch._dynamo.reset()
    elif method == "compile_budget0":
        import torch._functorch.config as functorch_config

        with functorch_config.patch(activation_memory_budget=0.0):
            try:
                yield
            finally:
                torch._dynamo.reset()
    else:
        yield


def measure_method(method: str, config, batch: dict, dtype, device, repeats: int,
                   compile_timeout: float | None = 600.0, seed: int = SEED, spec: BenchModel | None = None,
                   keep_step: bool = False) -> dict:
    """Build a fresh model, apply `method`, measure one step's memory and the median step time.

    `keep_step`: do not time it here; put the timed step under row["step"] instead (the caller
    times the methods in turn, `alternating_times`); compiled methods are always timed here."""
    row = {"method": method, "status": "ok", "note": ""}
    keep_step = keep_step and method not in COMPILED_METHODS and method != "compile_budget0"
    model = runner = None
    try:
        with _method_context(method), _time_limit(compile_timeout if method == "compile_budget0" or method in COMPILED_METHODS else None,
                                                      method):
            spec = spec or BenchModel("bert", config.hidden_size, config.vocab_size)
            model = spec.build(config, dtype, device, seed)
            runner, note = _prepare_or_unavailable(method, model, batch, spec)
            row["note"] = note
            row.update(stored_bits(method, runner, config.num_hidden_layers, dtype))
            _measure_runner(runner, batch, device, 0 if keep_step else repeats, seed, row)
    except Unavailable as e:
        row["status"] = f"unavailable: {e}"
    except Exception as e:  # a method must not take the whole benchmark down
        row["status"] = f"unavailable: {type(e).__name__}: {_short(e)}"
    finally:
        del model, runner
        gc.collect()
    return row


def stored_bits(method: str, runner, depth: int, dtype) -> dict:
    """{"stored_bits", "stored_bits_bf16"}: what `method` keeps across its layers for the backward, in bits per
    element of the hidden state, in the model's dtype and for the same model in bf16 — gradient checkpointing one
    layer input per layer, a reversible stack its two top streams and every layer's stored bits
    (`meft_fx.inspection.explain.StoredState`); {} for the other methods."""
    if method.startswith("lora_ckpt"):
        return {"stored_bits": depth * 8 * dtype.itemsize, "stored_bits_bf16": depth * 16}
    if not method.startswith("meft"):
        return {}
    from ..inspection.explain import stored_state
    from ..runtime import ReversibleStack
    from ..stream_width import bf16_stream_bits

    stacks = [(n, m) for n, m in runner.named_modules() if isinstance(m, ReversibleStack) and m.reversible]
    if len(stacks) != 1:
        return {}
    choice = next((getattr(m, "stream_choice", None) for m in runner.modules()
                   if getattr(m, "stream_choice", None) is not None), None)
    st = stored_state(*stacks[0], bf16_stream_bits(choice))
    return {"stored_bits": st.total_bits, "stored_bits_bf16": st.total_bits_in(16)}


def format_stored(rows: list[dict]) -> str:
    """Markdown: per (depth, method) the `stored_bits` accounting, beside gradient checkpointing's (empty when no row
    has it)."""
    have = {(r["depth"], r["method"]): r for r in rows if r.get("stored_bits")}
    if not have:
        return ""
    lines = ["", "What each method keeps across the layers for its backward, in bits per element of the hidden state "
             "(× hidden × tokens for bytes): gradient checkpointing one layer input per layer in the model's dtype; "
             "meft_fx its two top streams and every layer's stored bits (`explain` prints the same). bf16: the same "
             "model in bfloat16, where checkpointing keeps 16 bits per element per layer.", "",
             "| depth | method | bits per element | MiB at the longest sequence | in bf16 | bf16 × checkpointing |",
             "|---:|---|---:|---:|---:|---:|"]
    longest = max(r["seq"] for r in rows) * rows[0]["batch"]
    for (depth, method), r in sorted(have.items()):
        mib = r["stored_bits"] / 8 * r["hidden"] * longest / MiB
        lines.append(f"| {depth} | {method} | {r['stored_bits']} | {mib:.1f} | {r['stored_bits_bf16']} | "
                     f"{r['stored_bits_bf16'] / (16 * depth):.2f} |")
    return "\n".join(lines) + "\n"


def _prepare_or_unavailable(method: str, model, batch: dict, spec: BenchModel):
    """`prepare(method, model, batch, spec)`, any failure other than Unavailable reported as Unavailable."""
    try:
        return prepare(method, model, batch, spec)
    except Unavailable:
        raise
    except Exception as e:
        raise Unavailable(f"{method} could not be set up: {type(e).__name__}: {_short(e)}") from e


def _zero_grads(params) -> None:
    """Zero the existing .grad buffers of `params` in place."""
    for p in params:
        if p.grad is not None:
            p.grad.zero_()


def _measure_runner(runner, batch: dict, device, repeats: int, seed: int, row: dict) -> None:
    """Fill `row` with trainable/with-grad counts, step memory, saved bytes and the median step time of `runner`."""
    params = [p for p in runner.parameters() if p.requires_grad]
    row["trainable_params"] = int(sum(p.numel() for p in params))
    if not params:
        raise Unavailable("no trainable parameters")

    def step():
        out = runner(**batch)
        out.loss.backward()

    def timed_step():
        _zero_grads(params)
        step()

    _warm_up(step, params, seed, row)
    _zero_grads(params)
    torch.manual_seed(seed)
    mem = measure_step_memory(step, device)
    row.update(activation_mib=mem.activation_bytes / MiB, peak_mib=mem.peak_bytes / MiB,
               retained_mib=mem.retained_bytes / MiB)
    _zero_grads(params)
    row["saved_mib"] = _saved_mib(runner, batch, device, seed)
    if repeats:
        row["step_s"] = median_step_time(timed_step, warmup=0, repeats=repeats, device=device)
    else:  # timed by the caller, in turn with the other methods
        row["step"] = timed_step


def _warm_up(step, params, seed: int, row: dict) -> None:
    """Run the untimed first step (compiles / captures, creates the .grad buffers) and check gradients arrive."""
    try:
        torch.manual_seed(seed)
        step()  # warm-up: compiles / captures, creates the .grad buffers
    except Exception as e:
        raise Unavailable(f"the training step raised {type(e).__name__}: {_short(e)}") from e
    with_grad = sum(1 for p in params if p.grad is not None)
    if with_grad == 0:
        raise Unavailable("backward produced no gradient for any trainable parameter")
    row["params_with_grad"] = f"{with_grad}/{len(params)}"


def _saved_mib(runner, batch: dict, device, seed: int) -> float:
    """MiB a forward leaves alive for its backward (live bytes between the two, the loss kept alive)."""
    kept: list = []
    torch.manual_seed(seed)
    fwd = measure_step_memory(lambda: kept.append(runner(**batch).loss), device)
    kept[0].backward()
    kept.clear()
    return fwd.retained_bytes / MiB


# ---------------------------------------------------------------------------------------------
# the benchmark


def expand_methods(methods: str | Iterable[str] | None) -> list[str]:
    """'all' / None -> every method; 'meft' -> the six MEFT rows; 'meft3' -> meft3_float, meft3_exact."""
    if methods is None:
        return list(ALL_METHODS)
    if isinstance(methods, str):
        methods = [m for m in methods.split(",")]
    out: list[str] = []
    for m in (m.strip() for m in methods):
        if not m:
            continue
        if m == "all":
            names = list(ALL_METHODS)
        elif m == "meft":
            names = list(MEFT_METHODS)
        elif m in ("meft1", "meft2", "meft3"):
            names = [f"{m}_float", f"{m}_exact"]
        elif m == "compiled":
            names = list(COMPILED_METHODS)
        elif m == "decoder":
            names = list(DECODER_METHODS)
        elif m in ALL_METHODS or m in OPT_IN:
            names = [m]
        else:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS + COMPILED_METHODS)}, "
                             f"the *_nochunk rows, meft, meft1..3, compiled, decoder, all")
        out.extend(n for n in names if n not in out)
    return out


def _progress(total: int):
    """(write(line), advance(), close()) on stderr: tqdm if installed, plain lines otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, file=sys.stderr, desc="meft_fx.bench", leave=False, dynamic_ncols=True)
        return bar.write, (lambda: bar.update(1)), bar.close
    return (lambda line: print(line, file=sys.stderr, flush=True)), (lambda: None), (lambda: None)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per (depth, seq): activation ratios to full / lora / lora_ckpt / lora_ckpt_chunked, time ratios to lora / lora_ckpt.

    A time ratio of two methods timed in turn (both rows carry `step_times`, one per round) is the median of
    the rounds' ratios, with their range in `<key>_min` / `<key>_max`: a round compares the two methods under
    the same machine load, so a load that drifts during the run does not move it as it moves each median."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["depth"], r["seq"]), {})[r["method"]] = r
    for r in rows:
        group = groups[(r["depth"], r["seq"])]
        for key, base, field in (("ratio_full", "full", "activation_mib"), ("ratio_lora", "lora", "activation_mib"),
                                 ("ratio_lora_ckpt", "lora_ckpt", "activation_mib"),
                                 ("ratio_lora_ckpt_chunked", "lora_ckpt_chunked", "activation_mib")):
            b = group.get(base)
            ok = r["status"] == "ok" and b is not None and b["status"] == "ok" and b[field] > 0
            r[key] = r[field] / b[field] if ok else None
        for key, base in (("time_ratio_lora", "lora"), ("time_ratio_lora_ckpt", "lora_ckpt")):
            r.update(_time_ratio(r, group.get(base), key))
    return rows


def _time_ratio(row: dict, base: dict | None, key: str) -> dict:
    """{key: ratio of row's step time to base's} (None when either has none), plus `key`_min / `key`_max
    from the per-round ratios when both were timed in the same rounds."""
    ok = row["status"] == "ok" and base is not None and base["status"] == "ok" and base.get("step_s", 0) > 0
    if not ok or "step_s" not in row:
        return {key: None}
    mine, theirs = row.get("step_times"), base.get("step_times")
    if not mine or not theirs or len(mine) != len(theirs):
        return {key: row["step_s"] / base["step_s"]}
    median, lo, hi = paired_ratio(mine, theirs)
    return {key: median, f"{key}_min": lo, f"{key}_max": hi}


def run_benchmark(hidden: int, depths: Sequence[int], seqs: Sequence[int], batch: int, dtype="float32",
                  device="cpu", methods=None, repeats: int = 3, out: str | os.PathLike | None = None, *,
                  vocab: int = 30522, seed: int = SEED, compile_timeout: float | None = 600.0,
                  progress: bool = True, arch: str = "bert", heads: int | None = None, kv_heads: int | None = None,
                  intermediate: int | None = None, alternate: bool = True, lora_dropout: float = 0.1,
                  experts: int = 8, top_k: int = 2) -> list[dict]:
    """Run every method at every (depth, seq); return one dict per measurement.

    arch "bert", "llama" or "mixtral" (see meft_fx.bench.models; heads, kv_heads, intermediate default from
    hidden; `experts`, `top_k` for mixtral); `lora_dropout`: the LoRA baselines' dropout (PEFT's default is 0.0). Each row: arch, hidden, depth, seq, batch, dtype, device, method, status ("ok" or
    "unavailable: ..."), note, trainable_params, and when ok activation_mib, peak_mib, retained_mib,
    saved_mib (live bytes between forward and backward), step_s (median), step_s_min, step_s_max,
    step_times (one per round, when timed in turn), the activation ratios ratio_full, ratio_lora,
    ratio_lora_ckpt, ratio_lora_ckpt_chunked and the time ratios time_ratio_lora, time_ratio_lora_ckpt
    (None where the base method is missing; in turn: the median of the rounds' ratios, their range in
    time_ratio_*_min / _max — see `add_ratios`).
    With `out`, writes bench.md (the table), bench.json (the rows) and bench_memory.png.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    spec = BenchModel.smollm2(lora_dropout) if arch == "smollm2" else \
        BenchModel(arch, hidden, vocab, heads, kv_heads, intermediate, lora_dropout, experts, top_k)
    methods = expand_methods(methods)
    depths, seqs = [int(d) for d in depths], [int(s) for s in seqs]
    rows: list[dict] = []
    log = _progress(len(depths) * len(seqs) * len(methods)) if progress else (
        lambda line: None, lambda: None, lambda: None)
    t_start = time.perf_counter()
    try:
        for depth in depths:
            for seq in seqs:
                base = {"arch": arch, "title": spec.title, "hidden": spec.hidden, "heads": spec.num_heads, "depth": depth,
                        "seq": seq, "batch": batch, "dtype": str(torch_dtype).replace("torch.", ""),
                        "device": str(torch.device(device))}
                rows += _measure_group(spec, base, methods, torch_dtype, torch.device(device), repeats,
                                       compile_timeout, seed, log, t_start, alternate)
    finally:
        log[2]()
    add_ratios(rows)
    if out is not None:
        _write_outputs(rows, out)
    return rows


def _measure_group(spec: BenchModel, base: dict, methods, dtype, device, repeats, compile_timeout, seed, log,
                   t_start, alternate: bool = True) -> list[dict]:
    """The rows of every method at one (depth, seq): one model config and one batch shared by all.
    With `alternate`, the step times are taken in turn (balanced orders) after every memory measurement."""
    write, advance, _ = log
    depth, seq = base["depth"], base["seq"]
    config = spec.config(depth, seq)
    inputs = spec.batch(config, base["batch"], seq, device, seed)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        row = dict(base)
        row.update(measure_method(method, config, inputs, dtype, device, repeats, compile_timeout=compile_timeout,
                                  seed=seed, spec=spec, keep_step=alternate))
        row["elapsed_s"] = time.perf_counter() - t0
        rows.append(row)
        timed = f", {row['step_s']:.3f} s/step" if "step_s" in row else ""
        what = f"{row['activation_mib']:.2f} MiB{timed}" if row["status"] == "ok" else row["status"][:120]
        write(f"[{time.perf_counter() - t_start:7.1f}s] depth={depth} seq={seq} {method:<20} "
              f"{row['elapsed_s']:6.1f}s  {what}")
        advance()
        gc.collect()
    _time_in_turn(rows, repeats, device, write)
    return rows


def _time_in_turn(rows: list[dict], repeats: int, device, write) -> None:
    """Step times of the rows that left their step to the caller, the methods alternating round after round."""
    steps = {r["method"]: r.pop("step") for r in rows if "step" in r}
    if not steps:
        return
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    times = alternating_times({m: (lambda f=f: (f(), sync())) for m, f in steps.items()}, rounds=repeats, warmup=0)
    for r in rows:
        if r["method"] in times:
            t = times[r["method"]]
            r.update(step_s=statistics.median(t), step_s_min=min(t), step_s_max=max(t), step_times=list(t))
    write(f"  step times, {len(steps)} methods in turn × {repeats}: " + ", ".join(
        f"{m} {statistics.median(t):.3f} s" for m, t in times.items()))


@contextlib.contextmanager
def _replacing(path: str):
    """A temporary path next to `path` to write to, moved onto `path` only when the block completes: an
    interrupted run leaves the previous file (or none), never half of one."""
    tmp = f"{path}.partial"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    with _replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _write_outputs(rows: list[dict], out) -> None:
    os.makedirs(out, exist_ok=True)
    _write_text(os.path.join(out, "bench.md"), format_report(rows))
    with _replacing(os.path.join(out, "bench.json")) as tmp, open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    plot_memory(rows, os.path.join(out, "bench_memory.png"))


# ---------------------------------------------------------------------------------------------
# output


def _fmt(x, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio_cell(row: dict, key: str) -> str:
    """A time ratio, followed by its rounds' range when it has one: "0.96 (0.91–1.02)"."""
    cell = _fmt(row.get(key), ".2f")
    if row.get(f"{key}_min") is not None and row.get(f"{key}_max") is not None:
        cell += f" ({row[f'{key}_min']:.2f}–{row[f'{key}_max']:.2f})"
    return cell


def format_table(rows: list[dict]) -> str:
    """Markdown table, one line per (depth, seq, method)."""
    lines = ["| depth | seq | method | activation MiB | × full | × LoRA | × LoRA+ckpt | × LoRA+ckpt+chunked "
             "| saved MiB | step s | time × LoRA | time × LoRA+ckpt | trainable | note |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["depth"], r["seq"])):
        ok = r["status"] == "ok"
        note = r.get("note", "") if ok else r["status"]
        note = note.replace("|", "\\|")
        lines.append("| " + " | ".join([
            str(r["depth"]), str(r["seq"]), r["method"],
            _fmt(r.get("activation_mib") if ok else None, ".2f"),
            _fmt(r.get("ratio_full"), ".3f"), _fmt(r.get("ratio_lora"), ".3f"), _fmt(r.get("ratio_lora_ckpt"), ".3f"),
            _fmt(r.get("ratio_lora_ckpt_chunked"), ".3f"), _fmt(r.get("saved_mib") if ok else None, ".2f"),
            _fmt(r.get("step_s") if ok else None, ".3f"), _ratio_cell(r, "time_ratio_lora"),
            _ratio_cell(r, "time_ratio_lora_ckpt"),
            _fmt(r.get("trainable_params"), ","), note]) + " |")
    return "\n".join(lines) + "\n"


def format_report(rows: list[dict]) -> str:
    """The benchmark's Markdown report (`bench.md`): the run's settings, the table and the ratios' meaning."""
    if not rows:
        return "# meft_fx.bench\n\n(no rows)\n"
    r0 = rows[0]
    head = [
        "# meft_fx.bench: activation memory and step time",
        "",
        f"{r0.get('title', 'BertForSequenceClassification')}, batch {r0['batch']}, {r0['dtype']} on "
        f"{r0['device']}, dropout on where the model has it; torch {torch.__version__}.",
        "",
        "Activation memory = peak live tensor bytes during one forward+backward step minus the bytes the step "
        "leaves behind, measured after a warm-up step with gradients zeroed in place (so .grad buffers, "
        "parameters and inputs are not counted). Ratios are per (depth, seq). Step time: median of forward + "
        "backward (no optimizer). Timed in turn (the default), a time ratio is the median of the rounds' "
        "ratios (each round runs every method once), their range in parentheses. For full fine-tuning the "
        "peak includes transient gradient temporaries (notably the dense vocab × hidden embedding gradient before it is added into .grad). "
        "Saved MiB: bytes the forward leaves alive for the backward (measured separately); a method can save "
        "little and still peak high if its backward recomputes everything at once.",
        "",
        "",
    ]
    return "\n".join(head) + format_table(rows) + format_stored(rows)


def plot_memory(rows: list[dict], path: str) -> str | None:
    """Activation MiB vs depth, one line per method, one subplot per sequence length (one depth and several
    sequence lengths: vs sequence length, one plot). Returns the path, or None (with a note on stderr) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("meft_fx.bench: matplotlib is not installed; no plot written", file=sys.stderr)
        return None
    seqs = sorted({r["seq"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if len({r["depth"] for r in rows}) == 1 and len(seqs) > 1:
        return _plot_against_length(plt, rows, methods, path)
    fig, axes = plt.subplots(1, max(1, len(seqs)), figsize=(5.5 * max(1, len(seqs)), 4.2), squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        for method in methods:
            pts = sorted((r["depth"], r["activation_mib"]) for r in rows
                         if r["seq"] == seq and r["method"] == method and r["status"] == "ok")
            if pts:
                style = "-o" if method.startswith("meft") else "--s"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, markersize=4)
        ax.set_title(f"seq {seq}")
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel("activation memory (MiB)")
        ax.set_xticks(sorted({r["depth"] for r in rows}))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if rows:
        r0 = rows[0]
        fig.suptitle(f"{r0.get('arch', 'bert')} hidden {r0['hidden']}, batch {r0['batch']}, {r0['dtype']}, {r0['device']}")
    fig.tight_layout()
    with _replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _plot_against_length(plt, rows: list[dict], methods: list, path: str) -> str:
    """Activation MiB vs sequence length at one depth, one line per method."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in methods:
        pts = sorted((r["seq"], r["activation_mib"]) for r in rows if r["method"] == method and r["status"] == "ok")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if method.startswith("meft") else "--s",
                    label=method, markersize=4)
    r0 = rows[0]
    ax.set_xlabel(f"sequence length (batch {r0['batch']})")
    ax.set_ylabel("activation memory of one training step (MiB)")
    ax.set_xticks(sorted({r["seq"] for r in rows}))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    name = r0.get("title", r0.get("arch", "")).split(" (")[0].split(",")[0]
    ax.set_title(f"{name}, {r0['depth']} layers, batch {r0['batch']}, {r0['dtype']}", fontsize=9)
    fig.tight_layout()
    with _replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _generate(args) -> list[dict]:
    from .generation import format_generation, measure_generation

    spec = BenchModel.smollm2() if args.arch == "smollm2" else BenchModel(
        args.arch, args.hidden, args.vocab, args.heads, args.kv_heads, args.intermediate, experts=args.experts,
        top_k=args.top_k)
    rows = measure_generation(spec, args.depths[0], rounds=args.repeats, dtype=DTYPES[args.dtype],
                              device=args.device, seed=args.seed)
    text = format_generation(rows, spec.title)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        _write_text(os.path.join(args.out, "generation.md"), text)
    sys.stdout.write(text)
    return rows


def _quality_arguments(p) -> None:
    p.add_argument("--quality", action="store_true",
                   help="instead of one step's memory: fine-tune the real SmolLM2-135M-Instruct on a real task with "
                        "meft_fx and with LoRA at the same budget, held-out accuracy (meft_fx.bench.quality; --out "
                        "writes quality.md and quality.json)")
    p.add_argument("--steps", type=int, default=100, help="--quality: training steps per run")
    p.add_argument("--train-size", type=int, default=2000, help="--quality: training reviews")
    p.add_argument("--eval-size", type=int, default=300, help="--quality: held-out reviews")
    p.add_argument("--layers", type=int, default=None, help="--quality: keep the first LAYERS layers (tests)")
    p.add_argument("--lrs", nargs="*", default=None,
                   help="--quality: METHOD=LR[,LR...] per method (meft, lora_qv, lora_all); default "
                        "meft=1e-3,3e-3 lora_qv=3e-4,1e-3 lora_all=3e-4,1e-3")
    p.add_argument("--quality-methods", default=None,
                   help="--quality: comma-separated methods to run (default: meft,lora_qv,lora_all); with --out, the "
                        "other methods' rows are kept from its quality.json (an earlier run)")


def _quality(parser, args) -> list[dict]:
    from .finetune import METHODS
    from .quality import format_quality, merge_rows, parse_lrs, run_quality, write_quality

    try:
        lrs = parse_lrs(args.lrs)
    except ValueError as e:
        parser.error(str(e))
    methods = tuple(args.quality_methods.split(",")) if args.quality_methods else METHODS
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--quality-methods {args.quality_methods!r}: comma-separated, each one of {', '.join(METHODS)}")
    for name in ("steps", "batch", "train_size", "eval_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    rows = run_quality(methods=methods, lrs=lrs, steps=args.steps, batch=args.batch, train_size=args.train_size,
                       eval_size=args.eval_size, seed=args.seed, layers=args.layers)
    if args.out is not None:
        rows = merge_rows(rows, args.out) if methods != METHODS else rows
        write_quality(rows, args.out)
    sys.stdout.write(format_quality(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """`python -m meft_fx.bench [options]`: parse `argv`, run the benchmark, write its outputs; returns the rows."""
    p = argparse.ArgumentParser(prog="python -m meft_fx.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="bert", choices=ARCHS,
                   help="bert (encoder classifier), llama (decoder LM) or mixtral (decoder LM with routed experts), "
                        "random init; smollm2: the real pretrained SmolLM2-135M-Instruct (--depths: its first "
                        "layers, up to 30; --hidden, --vocab and the other shape options do not apply)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="llama, mixtral: key/value heads (default: heads)")
    p.add_argument("--experts", type=int, default=8, help="mixtral: routed experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="mixtral: experts per token (default 2)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="FFN width (default 4·hidden for bert, 8/3·hidden rounded to 32 for llama and each mixtral expert)")
    p.add_argument("--depths", type=_ints, default=[6, 12, 24], help="comma-separated, e.g. 6,12,24")
    p.add_argument("--seqs", type=_ints, default=[256, 512], help="comma-separated, e.g. 256,512")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated from {', '.join(ALL_METHODS)}; also 'meft', 'meft1'..'meft3', 'all', "
                        f"'decoder' ({', '.join(DECODER_METHODS)}), and (not in 'all') the *_compiled and "
                        f"*_nochunk rows, or 'compiled'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--lora-dropout", type=float, default=0.1,
                   help="dropout of the LoRA baselines' adapters (default 0.1; PEFT's own default is 0.0)")
    p.add_argument("--compile-timeout", type=float, default=600.0,
                   help="seconds before compile_budget0 is given up (0: no limit)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="directory for bench.md, bench.json and bench_memory.png")
    p.add_argument("--no-alternate", dest="alternate", action="store_false",
                   help="time each method right after its memory (one model alive at a time) instead of in turn")
    p.add_argument("--generate", action="store_true",
                   help="instead of training steps: generation tokens/s with the KV cache, converted vs unconverted "
                        "(meft_fx.bench.generation; a decoder --arch, first of --depths; --out writes generation.md)")
    p.add_argument("--fsdp", action="store_true",
                   help="instead: memory per rank under FSDP2, two CPU processes (meft_fx.bench.fsdp; smollm2, "
                        "first of --depths, --seqs; --out writes fsdp.md)")
    _quality_arguments(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        return _quality(p, args)
    if args.generate:
        return _generate(args)
    if args.fsdp:
        from .fsdp import format_fsdp, run_fsdp
        rows = run_fsdp(prepare, args.depths[0], args.seqs, args.seed, args.out)
        sys.stdout.write(format_fsdp(rows))
        return rows
    rows = run_benchmark(args.hidden, args.depths, args.seqs, args.batch, args.dtype, args.device,
                         expand_methods(args.methods), args.repeats, args.out, vocab=args.vocab, seed=args.seed,
                         compile_timeout=args.compile_timeout or None, arch=args.arch, heads=args.heads,
                         kv_heads=args.kv_heads, intermediate=args.intermediate, alternate=args.alternate,
                         lora_dropout=args.lora_dropout, experts=args.experts, top_k=args.top_k)
    sys.stdout.write(format_report(rows))
    return rows


if __name__ == "__main__":
    main()
