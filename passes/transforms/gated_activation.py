"""A gated activation `act(a) * b` (SwiGLU, GEGLU) keeps two tensors for its backward instead of three.

`mul(silu(a), b)` — and gelu, exact or tanh — whose activation feeds nothing else becomes one call of
`meft_fx.nn.gated.gated_act(a, b, kind)`: the same output and gradient bits, with `act(a)` recomputed in
the backward instead of kept (see that module). In a gated FFN these are the widest tensors (the
intermediate size per token), so each chunk of tokens of the reversible backward's recompute holds a
third less of them, and the chunks can be larger for the same memory.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from meft_fx.nn.gated import gated_act

from ..fx.provenance import replace_node

PASS = "gated_activation"
aten = torch.ops.aten
_MUL = {aten.mul.Tensor}


def _kind(n) -> str | None:
    """The gated_act kind of activation node `n` (whose output feeds one node), else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or len(n.users) != 1:
        return None
    if n.target == aten.silu.default and len(n.args) == 1 and not n.kwargs:
        return "silu"
    if n.target == aten.gelu.default and len(n.args) == 1:
        approximate = n.kwargs.get("approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def _tensor(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def gated_activation(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace `mul(act(a), b)` (either operand order, b a floating tensor of the product's shape) by
    `gated_act(a, b, kind)`."""
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _MUL or len(n.args) != 2 or n.kwargs:
            continue
        for act, other in (n.args, n.args[::-1]):
            kind = _kind(act)
            if kind is None or not _tensor(other) or not _tensor(n):
                continue
            if tuple(other.meta["val"].shape) != tuple(n.meta["val"].shape) or \
                    tuple(act.meta["val"].shape) != tuple(n.meta["val"].shape):
                continue  # broadcasting products are left alone
            replace_node(gm, n, "call_function", gated_act, (act.args[0], other, kind), PASS)
            gm.graph.erase_node(act)
            break
    gm.graph.lint()
    gm.recompile()
    return gm
