"""A vocabulary head feeding a cross-entropy becomes one `ChunkedHeadLoss` call: no full logits in training.

Found structurally: a `cross_entropy` whose input is a linear map's output, reached only through
reshapes and dtype casts (`logits.float().view(-1, V)`), each of which feeds nothing else but the
program's output (the returned logits). The head, its casts, the flattening and the loss become
`meft_head_loss(h, weight, bias, target) -> (loss, logits)`; the program returns that logits
(None in training: see `meft_fx.nn.head_loss.ChunkedHeadLoss`). Heads with fewer than
`MIN_CLASSES` outputs (a classifier) are left alone: their logits are small.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from meft_fx.nn.head_loss import DEFAULT_CHUNK_BYTES, REDUCTIONS, ChunkedHeadLoss
from ..fx.dataflow import output_node, tensor_dtype, tensor_shape
from ..fx.ops import is_shape_only
from ..fx.provenance import describe, stamp

PASS = "chunk_head_loss"
aten = torch.ops.aten
#: Heads with at least this many outputs (a vocabulary) are chunked.
MIN_CLASSES = 1024
_CE_ATEN = (aten.cross_entropy_loss.default,)
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device}
_ASSERTS = {aten._assert_tensor_metadata.default}
_ATEN_REDUCTION = {0: "none", 1: "mean", 2: "sum"}


@dataclass
class HeadLoss:
    """One head + cross-entropy found in a program: the nodes to rewrite, or `reason` why not."""

    loss: fx.Node
    linear: fx.Node | None = None
    chain: tuple = ()
    logits_out: fx.Node | None = None
    options: dict | None = None
    reason: str = ""


def _ce_options(n: fx.Node):
    """(input, target, options) of a cross-entropy node, or None when `n` is none."""
    if n.op != "call_function":
        return None
    if n.target in _CE_ATEN:
        a = list(n.args) + [None, 1, -100, 0.0][len(n.args) - 2:]
        kw = {**dict(zip(("weight", "reduction", "ignore_index", "label_smoothing"), a[2:6])), **n.kwargs}
        kw["reduction"] = _ATEN_REDUCTION.get(kw["reduction"], kw["reduction"])
        return a[0], a[1], kw
    if n.target is Fn.cross_entropy:
        names = ("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
        kw = {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None, "reduction": "mean",
              "label_smoothing": 0.0, **dict(zip(names, n.args[2:])), **n.kwargs}
        if kw.pop("size_average") is not None or kw.pop("reduce") is not None:
            kw["reduction"] = "legacy size_average/reduce"
        return n.args[0], n.args[1], kw
    return None


def _is_cast(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _CASTS
    return n.op == "call_method" and n.target in ("float", "to", "type_as", "double", "half", "bfloat16")


def _linear_parts(gm: fx.GraphModule, n: fx.Node):
    """(h, weight, bias) of a linear node as graph values (weight/bias of an nn.Linear as names), else None."""
    if n.op == "call_function" and n.target in (aten.linear.default, Fn.linear):
        return n.args[0], n.args[1], (n.args[2] if len(n.args) > 2 else n.kwargs.get("bias"))
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Linear):
        lin = gm.get_submodule(n.target)
        return n.args[0], f"{n.target}.weight", (f"{n.target}.bias" if lin.bias is not None else None)
    return None


def _walk_back(gm: fx.GraphModule, x) -> tuple[list, object]:
    """The reshape/cast chain from the loss input back to (excluding) what feeds it, and that node."""
    chain = []
    while isinstance(x, fx.Node) and (is_shape_only(x) or _is_cast(x)) and _linear_parts(gm, x) is None:
        chain.append(x)
        x = x.args[0]
    return chain, x


def _other_use(n: fx.Node, allowed: set):
    return next((u for u in n.users if u not in allowed and not (u.op == "call_function" and u.target in _ASSERTS)),
                None)


def _match(gm: fx.GraphModule, ce: fx.Node) -> HeadLoss:
    inp, target, opts = _ce_options(ce)
    found = HeadLoss(ce, options=opts)
    chain, lin = _walk_back(gm, inp)
    parts = _linear_parts(gm, lin) if isinstance(lin, fx.Node) else None
    shape = tensor_shape(lin) if isinstance(lin, fx.Node) else None
    if parts is None or not shape:
        found.reason = f"its input is not a linear map's output (through reshapes and casts): {describe(lin)}"
    elif opts["reduction"] not in REDUCTIONS or opts.get("weight") is not None:
        found.reason = f"reduction={opts['reduction']!r}, class weights={opts.get('weight') is not None}: not chunked"
    elif not isinstance(shape[-1], int) or shape[-1] < MIN_CLASSES:
        found.reason = f"{shape[-1]} classes (< {MIN_CLASSES}): the logits are small, not chunked"
    else:
        nodes = [lin] + chain[::-1]
        out = output_node(gm)
        returned = [n for n in nodes if out in n.users]
        for prev, nxt in zip(nodes, nodes[1:] + [ce]):
            other = _other_use(prev, {nxt, out})
            if other is not None:
                found.reason = f"the logits also feed {describe(other)}"
        if len(returned) > 1 or (returned and tensor_shape(returned[0]) != shape):
            found.reason = "the program returns reshaped logits"
        found.linear, found.chain, found.logits_out = lin, tuple(nodes[1:]), (returned or [None])[0]
    return found


def find_head_losses(gm: fx.GraphModule) -> list[HeadLoss]:
    """Every cross-entropy of the program, matched to its head (or with the reason it cannot be chunked)."""
    return [_match(gm, n) for n in gm.graph.nodes if _ce_options(n) is not None]


def _value(gm: fx.GraphModule, v):
    """A graph value for a head tensor: the node itself, or a get_attr for an nn.Linear's parameter name."""
    return gm.graph.get_attr(v) if isinstance(v, str) else v


def _rewrite(gm: fx.GraphModule, m: HeadLoss, name: str, chunk_bytes: int, mode: str) -> None:
    h, weight, bias = _linear_parts(gm, m.linear)
    out_dtype, lin_dtype = tensor_dtype(m.chain[-1] if m.chain else m.linear), tensor_dtype(m.linear)
    gm.add_submodule(name, ChunkedHeadLoss(
        logits_dtype=out_dtype if out_dtype != lin_dtype else None, ignore_index=int(m.options["ignore_index"]),
        label_smoothing=float(m.options["label_smoothing"]), reduction=m.options["reduction"],
        chunk_bytes=chunk_bytes, mode=mode))
    target = _ce_options(m.loss)[1]
    with gm.graph.inserting_before(m.loss):
        call = stamp(gm.graph.call_module(name, (h, _value(gm, weight), _value(gm, bias), target)), PASS)
        loss = stamp(gm.graph.call_function(operator.getitem, (call, 0)), PASS)
        logits = stamp(gm.graph.call_function(operator.getitem, (call, 1)), PASS)
    loss.meta.update({k: v for k, v in m.loss.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
    m.loss.replace_all_uses_with(loss)
    if m.logits_out is not None:
        logits.meta.update({k: v for k, v in m.logits_out.meta.items() if k in ("val", "tensor_meta")})
        output_node(gm).replace_input_with(m.logits_out, logits)
    for n in [m.loss, *reversed(m.chain), m.linear]:
        for u in list(n.users):
            if u.op == "call_function" and u.target in _ASSERTS:
                gm.graph.erase_node(u)
        gm.graph.erase_node(n)


def chunk_head_loss(gm: fx.GraphModule, chunk_bytes: int = DEFAULT_CHUNK_BYTES, mode: str = "vocab") -> fx.GraphModule:
    """Rewrite every chunkable head + cross-entropy of `gm` into a `ChunkedHeadLoss` (`meft_head_loss_*`).

    chunk_bytes, mode: see `meft_fx.nn.head_loss.linear_cross_entropy`."""
    for i, m in enumerate([x for x in find_head_losses(gm) if not x.reason]):
        _rewrite(gm, m, f"meft_head_loss_{i}" if i else "meft_head_loss", chunk_bytes, mode)
    gm.graph.lint()
    gm.recompile()
    return gm
