"""Float vs exact numerics, measured: the README's numerics tables.

    python examples/numerics_table.py                 # depth table (random BERT), ~3-4 min on 2 cores
    python examples/numerics_table.py --start         # MiniLM and SmolLM2 starting points vs λ/β = 2^-k, ~8 min
    python examples/numerics_table.py --start-default # SmolLM2's default conversion, fp32 and bf16 (the README's)

Depth table: a random BERT (hidden 64, 4 heads, intermediate 128) with 6, 12, 24 and 48 layers,
converted with MEFT3, batch 2 × sequence 32, fp32 and bf16; for each numerics mode:

* reconstruction error: run the stack forward (eval), then rebuild its input — the embedding-level
  stream — from the two top streams through every coupling's inverse; max |x_rebuilt − x| / max |x|
  (exact: the rebuilt int64 streams are compared with the quantized input; 0 means bit for bit);
* gradient error: max over adapter parameters of max |g_rev − g_ref| / max |g_ref|, reversible backward
  vs the same stack with `reversible=False` (train mode, dropout on, loss = a fixed random linear
  function of the stack's output);
* bytes stored per token per layer by the reversible forward (measured on the autograd node): the
  remainder bits (exact only) plus the two top streams amortised over the layers.

Float uses the paper's λ = β = 0.1, exact the default λ = β = 2^-EXACT_DEFAULT_K. Everything is
measured on the converted model's `ReversibleStack`, called with the (x, *context) the model passes
it, so one conversion per depth serves every row: numerics and λ/β are runtime attributes of the
stack and its couplings (what `MEFTConfig` sets), and the bf16 rows use the stack cast with
`.to(torch.bfloat16)` fed x in bf16 (BERT's F/G programs hold no dtype-specific constants).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

import meft_fx
from meft_fx import MEFTConfig, pretrained
from meft_fx.config import EXACT_DEFAULT_K
from meft_fx.conversion import ConvertedModule
from meft_fx.starting_point import set_scale_bits
from meft_fx.inspection.graphs import stack_call
from meft_fx.runtime import ReversibleStack

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_bert(layers: int, hidden: int):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=2,
                        attn_implementation="sdpa")
    return tf.BertForSequenceClassification(cfg)


def make_batch(batch: int, seq: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq - seq // 4:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def set_mode(st: ReversibleStack, numerics: str, method: str) -> None:
    """What `MEFTConfig(numerics=...)` builds: the stack's numerics and that mode's default λ/β."""
    lam, beta, _ = MEFTConfig(method=method, numerics=numerics).scales
    for c in st.couplings:
        c.lam, c.beta = lam, beta
    st.numerics = numerics


@torch.no_grad()
def reconstruction_error(st, x, ctx, numerics: str) -> float:
    """max |rebuilt stack input − x| / max |x| after running all couplings forward and back (eval)."""
    st.eval()
    scale = x.float().abs().max().item()
    arith, n = st.arithmetic, len(st.couplings)
    q = arith.encode(x)
    h1, h2, residues = q, q, []
    for i in range(n):  # the generated programs the stack runs, then their inverses
        h1, h2, r1, r2 = st.program(i, "forward", x.dtype)(h1, h2, None, *ctx)
        residues.append((r1, r2))
    for i in reversed(range(n)):
        h1, h2 = st.program(i, "inverse", x.dtype)(h1, h2, *residues[i], *ctx)
    x0 = arith.decode(q, x.dtype).double()
    err = max((arith.decode(h, x.dtype).double() - x0).abs().max().item() for h in (h1, h2))
    return err / scale if math.isfinite(err) else float("inf")


def stored_bytes(node) -> int:
    """Bytes of activations the reversible Function node keeps: the two top streams (+ the packed
    remainders in exact mode); not counted: RNG states and checksums (per call, not per token)."""
    total = sum(t.numel() * t.element_size() for t in node.saved_tensors[:2])
    for _tape, r1, r2, _check in node.saved:
        total += sum(t.numel() * t.element_size() for t in (r1, r2) if t is not None)
    return total


def adapter_grads(st, x, ctx, weights, reversible: bool, keep: dict):
    st.reversible = reversible
    st.train()
    st.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # same dropout masks in both runs
    out = st(x, *ctx)
    if reversible:
        keep["bytes"] = stored_bytes(out.grad_fn)
    (out.float() * weights).sum().backward()
    st.reversible = True
    return {n: p.grad.detach().float().clone() for n, p in st.named_parameters()
            if "meft_adapter" in n and p.grad is not None}


def grad_error(st, x, ctx) -> tuple[float, int]:
    """max over adapters of max |g_rev − g_ref| / max |g_ref|, and the bytes the reversible forward kept."""
    keep: dict = {}
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    g_rev = adapter_grads(st, x, ctx, weights, True, keep)
    g_ref = adapter_grads(st, x, ctx, weights, False, {})
    worst = 0.0
    for n, b in g_ref.items():
        a = g_rev.get(n)
        e = float("nan") if a is None else ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, e) if math.isfinite(e) else float("inf")
    return worst, keep["bytes"]


def fmt_err(e: float) -> str:
    if e == 0:
        return "0 (bit-exact)"
    if not math.isfinite(e):
        return "inf/NaN"
    return f"{e:.1e}"


def depth_table(depths, hidden, seq, batch, method):
    inputs = make_batch(batch, seq)
    tokens = batch * seq
    rows = []
    for L in depths:
        t0 = time.time()
        torch.manual_seed(7)
        model = meft_fx.convert(random_bert(L, hidden), MEFTConfig(method=method, numerics="exact"))
        st32, x32, ctx = stack_call(model, inputs)
        for dname, dtype in DTYPES.items():
            st = st32 if dtype == torch.float32 else copy.deepcopy(st32).to(dtype)
            x = x32.to(dtype)
            for numerics in ("float", "exact"):
                set_mode(st, numerics, method)
                rec = reconstruction_error(st, x, ctx, numerics)
                gerr, nbytes = grad_error(st, x, ctx)
                top = 2 * x.shape[-1] * (8 if numerics == "exact" else x.element_size()) * tokens
                rows.append((L, dname, numerics, rec, gerr, (nbytes - top) / tokens / L, nbytes / tokens / L))
        print(f"  depth {L}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    lam, beta, _ = MEFTConfig(method=method, numerics="exact").scales
    print(f"\n{method.upper()}, random BERT hidden {hidden}, batch {batch} × seq {seq} (last row 1/4 padding); "
          f"float: the paper's λ/β (0.1), exact: λ = {lam:g}, β = {beta:g}, 32 fractional bits\n")
    print("| layers | dtype | numerics | reconstruction error | gradient error | stored B/token/layer | incl. top streams |")
    print("|---|---|---|---|---|---|---|")
    for L, d, n, rec, gerr, per_layer, total in rows:
        print(f"| {L} | {d} | {n} | {fmt_err(rec)} | {fmt_err(gerr)} | {per_layer:g} | {total:.1f} |")
    k1, k2 = (EXACT_DEFAULT_K if s != 1.0 else 0 for s in (lam, beta))
    print(f"\nreconstruction error: max |x_rebuilt − x| / max |x| for the stack input x rebuilt from the top streams; "
          f"gradient error: max over adapter parameters of max |g_rev − g_ref| / max |g_ref| against reversible=False; "
          f"stored (measured on the autograd node): per layer, the packed remainders ({k1 + k2} bits per element in "
          f"exact mode, nothing in float mode); incl. top streams: plus the two top streams, kept once per stack "
          f"(2·{hidden}·itemsize bytes per token in float mode, 2·{hidden}·8 in exact mode), amortised over the layers. "
          f"Not counted: RNG states for dropout replay and the checksums (per call, not per token).")


def _minilm_measure():
    model, tok = pretrained.minilm()
    sentences = ["The movie was a delight from start to finish.", "I would not recommend this restaurant.",
                 "Reversible networks rebuild activations instead of storing them.",
                 "A cat sat on the mat and looked out of the window at the rain all afternoon."]
    inputs = dict(tok(sentences, padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()

    def cosine(m):
        with torch.no_grad():
            out = m.eval()(**inputs).last_hidden_state
        return f"{torch.nn.functional.cosine_similarity(out[mask], ref[mask], dim=-1).mean().item():.4f}"
    return model, cosine


def _smollm2_measure(model=None, tok=None):
    if model is None:
        model, tok = pretrained.smollm2()
    batch = dict(tok(pretrained.prose(), return_tensors="pt", padding=True))
    ppl, top1 = pretrained.next_token_stats(model, batch)

    def ratio(m):
        got, got1 = pretrained.next_token_stats(m, batch)
        return f"{got / ppl:.3f} / {100 * (got1 == top1).float().mean().item():.1f}%"
    return model, ratio


def start_table(ks):
    """The starting point of MiniLM and SmolLM2 against k, the paper's couplings and leak-compensated ones."""
    print("| model | method | couplings | " + " | ".join(f"k = {k}" for k in ks) + " | convert's choice |")
    print("|---|---|---|" + "---|" * (len(ks) + 1))
    for name, make in (("all-MiniLM-L6-v2", _minilm_measure), ("SmolLM2-135M-Instruct", _smollm2_measure)):
        model, measure = make()
        for method in ("meft1", "meft2", "meft3"):
            torch.manual_seed(0)
            conv = meft_fx.convert(model, MEFTConfig(method=method, verbose=False))
            cm = next(m for m in conv.modules() if isinstance(m, ConvertedModule))
            chosen = cm.starting_point
            for compensated in (False, True):
                cells = []
                for k in ks:  # λ/β and the compensation are runtime attributes of the couplings
                    _set_couplings(cm, k, compensated)
                    cells.append(measure(conv))
                if compensated:
                    _set_couplings(cm, chosen.scale_bits, True)
                choice = (f"k = {chosen.scale_bits}: {measure(conv)}" + ("" if chosen.within else " (warned)")
                          if compensated else "")
                print(f"| {name} | {method} | {'compensated' if compensated else 'paper'} | " + " | ".join(cells)
                      + f" | {choice} |", flush=True)
    print("\nMiniLM: mean cosine of last_hidden_state to the original's over non-padding tokens (4 sentences). "
          "SmolLM2: perplexity on meft_fx/data/prose.txt ÷ the original's, and the share of positions whose top-1 "
          "next token is the original's. Eval mode, fp32, adapters at the paper's N(0, 0.02) init (seed 0). "
          "convert's choice: the k the default conversion measured (fewest stored bits within start_tolerance "
          "on its probe), with the same measure.")


def default_table():
    """The README's table: SmolLM2's default conversion in fp32 and bf16, the paper's couplings at its scale, and
    MEFT3 (what method="auto" does not pick for this decoder) at the scale convert measures for it."""
    print("| conversion | k (bits per element per layer) | perplexity ÷ original | top-1 next token = original's | "
          f"{len(pretrained.QUESTIONS)} questions: answer = original's (common prefix) | \"What is the capital of France?\" |")
    print("|---|---:|---:|---:|---:|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = pretrained.smollm2(dtype)
        _, measure = _smollm2_measure(model, tok)
        same_answers = _answers_measure(model, tok)
        name, original = str(dtype).replace("torch.", ""), _answer(model, tok)
        for method in ("auto", "meft3"):
            torch.manual_seed(0)
            conv = meft_fx.convert(model, MEFTConfig(method=method, verbose=False))
            cm = next(m for m in conv.modules() if isinstance(m, ConvertedModule))
            k = cm.starting_point.scale_bits
            label = f"default ({cm.config.method.upper()})" if method == "auto" else f'`method="{method}"`'
            print(f"| {label}, {name} | {k} ({cm.starting_point.stored_bits}) | "
                  f"{measure(conv).replace(' / ', ' | ')} | {same_answers(conv)} | {original} → "
                  f"{_answer(conv, tok)} |", flush=True)
            if method == "auto":
                _set_couplings(cm, k, False)
                print(f"| the paper's couplings at the same scale, {name} | {k} | "
                      f"{measure(conv).replace(' / ', ' | ')} | {same_answers(conv)} | {_answer(conv, tok)} |",
                      flush=True)
    print(f"\nSmolLM2-135M-Instruct, eval mode; perplexity on meft_fx/data/prose.txt; answers greedy with the KV cache: "
          f"{len(pretrained.QUESTIONS)} questions in one left-padded batch, {pretrained.ANSWER_TOKENS} new tokens each (how many answers are "
          f"the original's token for token, and the mean number of leading tokens in common), and the France question "
          f"alone (original → converted).")


def _answers_measure(model, tok):
    """A function of a converted model: "same / asked (mean common prefix)" of its greedy answers to
    `pretrained.QUESTIONS` against `model`'s."""
    ref = pretrained.answers(model, tok)

    def same(conv) -> str:
        n, prefix = pretrained.same_answers(pretrained.answers(conv, tok), ref)
        return f"{n}/{len(pretrained.QUESTIONS)} ({prefix:.1f})"
    return same


def _answer(model, tok) -> str:
    ids = pretrained.chat_prompt(tok, "What is the capital of France?")
    out = model.eval().generate(ids, max_new_tokens=10, do_sample=False)
    return repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def _set_couplings(cm, k: int, compensated: bool) -> None:
    """λ/β = 2^-k on the scaled streams of every coupling of `cm`, the scaled halves leak-compensated or not."""
    set_scale_bits(cm, k)
    for st in cm.stacks:
        for c in st.couplings:
            c.compensate_f, c.compensate_g = compensated and c.lam != 1.0, compensated and c.beta != 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--method", default="meft3", choices=["meft1", "meft2", "meft3"])
    ap.add_argument("--start", action="store_true", help="the starting point of MiniLM and SmolLM2 against k, the "
                    "paper's couplings beside leak-compensated ones, instead of the depth table")
    ap.add_argument("--start-default", action="store_true", help="the README's table: SmolLM2's default conversion "
                    "in fp32 and bf16 beside the paper's couplings at the same scale")
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 4, 5, 6, 8])
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args.start:
        start_table(args.ks)
    elif args.start_default:
        default_table()
    else:
        depth_table(args.depths, args.hidden, args.seq, args.batch, args.method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
