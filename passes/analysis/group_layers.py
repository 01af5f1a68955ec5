"""Group each stack's residual units into transformer layers: attention unit(s) then one FFN unit,
or one parallel unit (x + attn(x) + ffn(x), GPT-J / GPT-NeoX / Falcon style).

A layer is the unit of a reversible coupling. Units that do not complete a layer (an FFN with no
attention before it, attention at the end of a stack) are left out, with the reason; a stack is
cut into contiguous runs of complete layers.
"""
from __future__ import annotations

from .records import Layer, Stack, StreamAnalysis

PASS = "group_layers"


def group_layers(analysis: StreamAnalysis) -> StreamAnalysis:
    """Return the analysis with `Stack.layers` filled, stacks split at incomplete layers."""
    out, rejected = [], list(analysis.rejected)
    for stack in analysis.stacks:
        runs, layers, pending = [], [], []
        for u in stack.units:
            if u.kind == "parallel":  # a whole layer; attention units before it complete no layer
                if pending:
                    rejected.extend(_no_ffn(v) for v in pending)
                    runs, layers, pending = runs + [layers] if layers else runs, [], []
                layers.append(Layer(units=[u]))
                continue
            if u.kind == "attention":
                pending.append(u)
                continue
            if not pending:
                rejected.append(f"FFN block {u.module or u.add} has no attention block before it; not rewritten")
                if layers:
                    runs.append(layers)
                    layers = []
                continue
            layers.append(Layer(units=pending + [u]))
            pending = []
        rejected.extend(_no_ffn(u) for u in pending)
        if layers:
            runs.append(layers)
        if not runs:
            rejected.append(f"stack in {stack.owner or 'the model'} ({len(stack.units)} residual blocks) has no complete layer")
        for r in runs:
            units = [u for layer in r for u in layer.units]
            out.append(Stack(units=units, owner=stack.owner, layers=r))
    return StreamAnalysis(stacks=out, rejected=rejected)


def _no_ffn(u) -> str:
    return f"attention block {u.module or u.add} is not followed by an FFN block; not rewritten"
