"""Routed experts' grouped products compute only the gradients that are wanted.

transformers traces a MoE layer's grouped product (any dtype but bfloat16) as the custom op
`transformers::grouped_mm_fallback`, whose backward always computes the experts' weight gradient too — a
zero-filled tensor the size of all the experts' weights and one `mm` per expert — though a MEFT model
trains adapters only and the experts stay frozen. Each such call becomes
`meft_fx.nn.experts.grouped_mm(input, weight, offs)`: the same `mm` calls forward (the same bits), and a
backward that skips what is not wanted (the README's Mixtral table). In a reversible stack the experts' half
also runs in chunks of tokens, and each chunk's backward would otherwise fill that zero tensor again.
"""
from __future__ import annotations

import torch.fx as fx

from meft_fx.nn.experts import grouped_mm

from ..fx.provenance import replace_node

PASS = "grouped_experts"
#: the traced op this pass replaces, by name (transformers registers it when its MoE integration loads)
FALLBACK = "transformers.grouped_mm_fallback.default"


def grouped_experts(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every `transformers::grouped_mm_fallback(input, weight, offs)` call by `grouped_mm`."""
    found = False
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and str(n.target) == FALLBACK and len(n.args) == 3 and not n.kwargs:
            replace_node(gm, n, "call_function", grouped_mm, tuple(n.args), PASS)
            found = True
    if found:
        gm.graph.lint()
        gm.recompile()
    return gm
