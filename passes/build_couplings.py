"""Each stack of layers is one call to a `ReversibleStack` of MEFT couplings.

Per layer, F and G are cut out of the graph as sub-GraphModules `(stream, *context) -> stream`
(MEFT3: F = attention sub-block(s), G = FFN sub-block; MEFT1: F = whole layer, G = adapter;
MEFT2: F = adapter, G = whole layer). The stack's region of the graph is replaced by
`meft_stack(x, *context)`, which returns the stream chosen by `config.output`.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from meft_fx.adapters import Adapter
from meft_fx.coupling import Coupling, ReversibleStack
from meft_fx.errors import ConversionError
from ._graph import data_dag, describe, extract, graph_has_random, output_node, region, stamp, tensor_shape, node_value
from .blocks import StreamAnalysis

PASS = "build_couplings"


class AdapterOnly(nn.Module):
    """F or G made of an adapter alone (MEFT1's G, MEFT2's F)."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        self.meft_adapter = adapter

    def forward(self, x, *context):
        return self.meft_adapter(x)


class NoUpdate(nn.Module):
    """F or G that adds nothing: MEFT1's last G, whose stream never reaches the output."""

    def forward(self, x, *context):
        return torch.zeros_like(x)


def output_stream(method: str, swap: bool, output: str):
    """Which stream carries the pretrained chain at the top: 0 (h1), 1 (h2) or "mean"."""
    if output == "mean":
        return "mean"
    idx = 0 if method == "meft1" else 1  # F writes stream 1 (MEFT1's F is the layer); G writes stream 2
    return 1 - idx if swap else idx


def build_couplings(gm: fx.GraphModule, analysis: StreamAnalysis, config, registry: dict | None = None) -> fx.GraphModule:
    """Replace each stack in `gm` by a `ReversibleStack` submodule call.

    Stand-alone adapters (MEFT1's G, MEFT2's F) are taken from / added to `registry` by name.
    """
    registry = {} if registry is None else registry
    lam, beta, swap = config.scales
    single = len(analysis.stacks) == 1
    for si, stack in enumerate(analysis.stacks):
        tag = "" if single else f"s{si}_"
        dag = data_dag(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        start, end = nodes[stack.start], nodes[stack.end]
        stack_region = region(dag, start, end)
        v = node_value(start)
        dim = tensor_shape(start)[-1]
        dtype, device = getattr(v, "dtype", None), getattr(v, "device", None)
        if device is not None and device.type == "meta":
            device = None
        union: list = []
        couplings = []
        has_random = config.adapter_dropout > 0

        def cut(a: str, b: str, name: str):
            nonlocal has_random
            sub, ctx = extract(gm, region(dag, nodes[a], nodes[b]), nodes[a], nodes[b], name, PASS)
            idx = []
            for c in ctx:
                if c in stack_region:
                    raise ConversionError(
                        f"[{PASS}] {name} reads {describe(c)}, which is computed inside the stack from the stream; "
                        f"a reversible coupling can only take context that is constant across layers")
                if c not in union:
                    union.append(c)
                idx.append(union.index(c))
            has_random = has_random or graph_has_random(sub)
            return sub, idx

        def adapter_only(key):
            if key not in registry:
                registry[key] = Adapter(int(dim), config.adapter_rank, config.adapter_activation, config.adapter_dropout,
                                        config.adapter_init_std, dtype=dtype, device=device)
            return AdapterOnly(registry[key])

        for li, layer in enumerate(stack.layers):
            blocks = [(u.label(layer.module), u.kind) for u in layer.units]
            if config.method == "meft3":
                F, fi = cut(layer.start, layer.attention[-1].end, f"Layer{li}Attention")
                G, gi = cut(layer.ffn.entry or layer.ffn.start, layer.ffn.end, f"Layer{li}FFN")
                f_blocks, g_blocks = blocks[:-1], blocks[-1:]
            elif config.method == "meft1":
                F, fi = cut(layer.start, layer.end, f"Layer{li}")
                if li == len(stack.layers) - 1 and config.output == "pretrained":
                    # The top G writes the stream that is not returned: an adapter there could never train.
                    G, gi, g_blocks = NoUpdate(), [], [("none (its stream is not the output)", "adapter")]
                else:
                    G, gi, g_blocks = adapter_only(f"meft_adapter_{tag}{li}_G"), [], [("adapter", "adapter")]
                f_blocks = blocks
            else:
                F, fi = adapter_only(f"meft_adapter_{tag}{li}_F"), []
                G, gi = cut(layer.start, layer.end, f"Layer{li}")
                f_blocks, g_blocks = [("adapter", "adapter")], blocks
            info = {"layer": layer.module, "F": f_blocks, "G": g_blocks}
            couplings.append(Coupling(F, G, lam, beta, swap, fi, gi, info=info))
        name = "meft_stack" if single else f"meft_stack_{si}"
        info = {"owner": stack.owner, "method": config.method, "numerics": config.numerics, "dim": int(dim)}
        if config.numerics == "exact":
            info["exponents"] = config.exponents
        mod = ReversibleStack(couplings, len(union), output_stream(config.method, swap, config.output),
                              reversible=config.reversible, has_random=has_random, info=info,
                              numerics=config.numerics)
        gm.add_submodule(name, mod)
        with gm.graph.inserting_after(end):
            call = stamp(gm.graph.call_module(name, (start, *union)), PASS)
        call.meta.update({k: end.meta[k] for k in ("val", "tensor_meta") if k in end.meta})
        end.replace_all_uses_with(call)
        _erase(gm, stack_region, keep=call)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _erase(gm: fx.GraphModule, nodes: set, keep: fx.Node) -> None:
    """Erase `nodes` and whatever (dead) depends on them."""
    doomed = set(nodes)
    frontier = list(nodes)
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u is keep or u in doomed:
                continue
            if u.op == "output":
                raise ConversionError(f"[{PASS}] the graph output reads {describe(n)}, an intermediate value of the "
                                      f"reversible stack; convert without returning per-layer hidden states/attentions")
            doomed.add(u)
            frontier.append(u)
    inputs = {a for n in doomed for a in n.all_input_nodes} - doomed
    for n in reversed(list(gm.graph.nodes)):
        if n in doomed:
            gm.graph.erase_node(n)
    for a in inputs:  # parameters only the stack read
        if a.op == "get_attr" and not a.users:
            gm.graph.erase_node(a)
