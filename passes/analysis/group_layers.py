"""Group each stack's residual units into transformer layers: attention unit(s) then one FFN unit.

A layer is the unit of a reversible coupling. Units that do not complete a layer (an FFN with no
attention before it, attention at the end of a stack) are left out, with the reason; a stack is
cut into contiguous runs of complete layers.
"""
from __future__ import annotations

from collections import Counter

from .records import Layer, Stack, StreamAnalysis

PASS = "group_layers"


def group_layers(analysis: StreamAnalysis) -> StreamAnalysis:
    """Return the analysis with `Stack.layers` filled, stacks split at incomplete layers."""
    out, rejected = [], list(analysis.rejected)
    for stack in analysis.stacks:
        runs, layers, pending = [], [], []
        for u in stack.units:
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
        for u in pending:
            rejected.append(f"attention block {u.module or u.add} is not followed by an FFN block; not rewritten")
        if layers:
            runs.append(layers)
        rejected.extend(_shared_layer_notes(stack))
        if not runs:
            rejected.append(f"stack in {stack.owner or 'the model'} ({len(stack.units)} residual blocks) has no complete layer")
        for r in runs:
            units = [u for layer in r for u in layer.units]
            out.append(Stack(units=units, owner=stack.owner, layers=r))
    return StreamAnalysis(stacks=out, rejected=rejected)


def _shared_layer_notes(stack: Stack) -> list:
    """Why a stack of one module called several times (shared weights, ALBERT-style) saves little."""
    calls = Counter(u.module for u in stack.units if u.module and u.kind == "ffn")
    return [f"[{PASS}] {m} is one module called {n} times (shared weights, ALBERT-style): each call becomes its own "
            f"depth-1 reversible stack, which keeps every call's input; converting the whole depth as one stack is "
            f"not supported yet" for m, n in calls.items() if n > 1]
