"""Each stack of layers is one call to a `ReversibleStack` of MEFT couplings.

Per layer, F and G are what the method table (`meft_fx.config.METHODS`) names: the attention
sub-block(s), the FFN sub-block or the whole layer — cut out of the graph as sub-GraphModules
`(stream, *context) -> stream` — or an adapter alone. The stack's region of the graph is replaced
by `meft_stack(x, *context)`, which returns the stream chosen by `config.output`.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from meft_fx.errors import ConversionError
from meft_fx.nn.adapter import Adapter, AdapterOnly, NoUpdate
from meft_fx.runtime import Coupling, CouplingRecord, ReversibleStack, StackRecord
from meft_fx.nn.experts import grouped_mm
from meft_fx.runtime.chunks import MIN_EXPERT_ROWS, ChunkPlan
from ..analysis.records import StreamAnalysis
from ..fx.dataflow import data_dag, node_value, per_token, region, tensor_shape, widest_per_token
from ..fx.extraction import extract
from ..fx.ops import graph_has_random
from ..fx.provenance import describe, stamp
from .local_sizes import local_sizes
from .sliced_ffn import SLICE_SHARE, sliced_ffn

PASS = "build_couplings"
#: ops that change a weight's layout, not which elements it holds (`_StackCutter._from_weights`)
_LAYOUT = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.t.default,
           torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.clone.default,
           torch.ops.aten.contiguous.default, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default,
           torch.ops.aten.alias.default}
#: routed experts' grouped products (rows sorted by expert, experts × in × out weights)
_GROUPED = (grouped_mm, torch.ops.aten._grouped_mm.default)
NO_UPDATE = (("none (its stream is not the output)", "adapter"),)

# role → (region of the layer: (start, end) node names, its blocks, class-name suffix of the cut)
_ROLES = {
    "attention": lambda layer, blocks: (layer.start, layer.attention[-1].end, blocks[:-1], "Attention"),
    "ffn": lambda layer, blocks: (layer.ffn.entry or layer.ffn.start, layer.ffn.end, blocks[-1:], "FFN"),
    "layer": lambda layer, blocks: (layer.start, layer.end, blocks, ""),
}


class _StackCutter:
    """Cuts the F/G regions of one stack out of `gm`, collecting the context they read."""

    def __init__(self, gm: fx.GraphModule, stack, config, registry: dict, tag: str):
        self.gm, self.config, self.registry, self.tag = gm, config, registry, tag
        self.dag = data_dag(gm)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.start, self.end = self.nodes[stack.start], self.nodes[stack.end]
        self.region = region(self.dag, self.start, self.end)
        v = node_value(self.start)
        self.dim = int(tensor_shape(self.start)[-1])
        device = getattr(v, "device", None)
        self.dtype, self.device = getattr(v, "dtype", None), None if device is None or device.type == "meta" else device
        self.context: list = []
        self.has_random = config.adapter_dropout > 0

    def cut(self, a: str, b: str, name: str):
        sub, ctx = extract(self.gm, region(self.dag, self.nodes[a], self.nodes[b]), self.nodes[a], self.nodes[b],
                           name, PASS)
        idx = []
        for c in ctx:
            if c in self.region:
                raise ConversionError(
                    f"[{PASS}] {name} reads {describe(c)}, which is computed inside the stack from the stream; "
                    f"a reversible coupling can only take context that is constant across layers")
            if c not in self.context:
                self.context.append(c)
            idx.append(self.context.index(c))
        self.has_random = self.has_random or graph_has_random(sub)
        return sub, idx

    def adapter_only(self, key: str) -> AdapterOnly:
        cfg = self.config
        if key not in self.registry:
            self.registry[key] = Adapter(self.dim, cfg.adapter_rank, cfg.adapter_activation, cfg.adapter_dropout,
                                         cfg.adapter_init_std, dtype=self.dtype, device=self.device)
        return AdapterOnly(self.registry[key])

    def half(self, layer, li: int, half: str, role: str):
        """(module, context positions, blocks) of F or G of layer `li`, by its role in the method table."""
        if role == "adapter":
            return self.adapter_only(f"meft_adapter_{self.tag}{li}_{half}"), [], (("adapter", "adapter"),)
        blocks = tuple((u.label(layer.module), u.kind) for u in layer.units)
        start, end, mine, suffix = _ROLES[role](layer, blocks)
        sub, idx = self.cut(start, end, f"Layer{li}{suffix}")
        if role == "ffn":  # position-wise: the sizes it reshapes to are its input's own (chunks of tokens)
            gone = local_sizes(sub, [self.context[i] for i in idx])
            idx = [i for pos, i in enumerate(idx) if pos not in gone]
        return sub, idx, mine

    def same_for_every_token(self, position: int) -> bool:
        """Is context value `position` the same for every token, so that every chunk of tokens can take it whole?
        Yes for a tensor with concrete sizes that is per feature — shape (), (dim,) or (1, ..., 1, dim), e.g. a
        norm's weight computed outside the layer (Gemma's 1 + w) — or a weight seen through layout ops (Mixtral's
        experts' weights, transposed outside the layer). Sizes, masks and position tables are not."""
        node = self.context[position]
        shape = tensor_shape(node)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return False
        per_feature = len(shape) == 0 or (shape[-1] in (1, self.dim) and all(d == 1 for d in shape[:-1]))
        return per_feature or self._from_weights(node)

    @staticmethod
    def _from_weights(node: fx.Node) -> bool:
        """Is `node` a weight (get_attr) seen through layout ops only (transpose, permute, view, cast, ...)? Not a
        table gathered or sliced from one (`wpe[arange(T)]`: a position table, the same in no two tokens)."""
        while node.op == "call_function" and node.target in _LAYOUT and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node.op == "get_attr"

    def chunk_plan(self, module, role: str, context) -> ChunkPlan | None:
        """A ChunkPlan for a position-wise half (the FFN) whose context, if any, is the same for every token (every
        chunk gets it whole); None otherwise (a whole layer, MEFT1/2's F or G, holds the attention: it runs whole,
        its gated FFN in slices). A reversible half's gated FFN runs in slices of its width
        (`sliced_ffn`, slices within budget / SLICE_SHARE): the token chunks are then sized by the other parameters, except when the half is compiled
        (`compiled_width`: the plain ops run there). Otherwise the width is the widest activation: a weight's,
        or more per token (Mixtral's top-k experts), with at least MIN_EXPERT_ROWS rows per expert."""
        budget = self.config.recompute_chunk_bytes
        if role == "layer" and budget and self.config.reversible and isinstance(module, fx.GraphModule):
            sliced_ffn(module, budget // SLICE_SHARE)  # SmolLM2 MEFT1, 1024 tokens: one step 72.9 → 51.9 MiB
            return None
        if role != "ffn" or not budget or not isinstance(module, fx.GraphModule) \
                or not all(map(self.same_for_every_token, context)):
            return None
        sliced = sliced_ffn(module, budget // SLICE_SHARE) if self.config.reversible else set()
        named = dict(module.named_parameters())
        widths = [self.dim] + [p.shape[0] for n, p in named.items() if p.dim() == 2 and n not in sliced]
        if not sliced:
            return ChunkPlan(max(widths + [widest_per_token(module)]), budget, min_rows=_min_expert_tokens(module))
        return ChunkPlan(max(widths), budget, compiled_width=max(widths + [named[n].shape[0] for n in sliced]))

    def coupling(self, layer, li: int, top: bool) -> Coupling:
        cfg, spec = self.config, self.config.spec
        lam, beta, swap = cfg.scales
        F, fi, f_blocks = self.half(layer, li, "F", spec.F)
        out = spec.output_stream(cfg.output)
        if top and out != "mean" and out != (0 if swap else 1):
            G, gi, g_blocks = NoUpdate(), [], NO_UPDATE  # G's stream is not returned: an adapter there never trains
        else:
            G, gi, g_blocks = self.half(layer, li, "G", spec.G)
        plans = {h: self.chunk_plan(m, role, ctx) for h, m, role, ctx in (("F", F, spec.F, fi), ("G", G, spec.G, gi))}
        return Coupling(F, G, lam, beta, swap, fi, gi, record=CouplingRecord(layer.module, f_blocks, g_blocks),
                        chunks={h: p for h, p in plans.items() if p is not None},
                        compensate_f=cfg.leak_compensation and spec.F != "adapter",
                        compensate_g=cfg.leak_compensation and spec.G != "adapter" and not isinstance(G, NoUpdate))


def _min_expert_tokens(half) -> int:
    """The fewest tokens a chunk of `half` may hold: enough for `MIN_EXPERT_ROWS` rows per expert of each of its
    grouped expert products (top-k rows per token, spread over the weight's experts); 1 without such products."""
    fewest = 1
    for n in half.graph.nodes:
        if n.op == "call_function" and n.target in _GROUPED:
            rows, weight = tensor_shape(n.args[0]), tensor_shape(n.args[1])
            top_k = per_token(half, rows[:1]) if rows and weight and len(weight) == 3 else None
            if top_k:
                fewest = max(fewest, -(-MIN_EXPERT_ROWS * int(weight[0]) // top_k))
    return fewest


def build_couplings(gm: fx.GraphModule, analysis: StreamAnalysis, config, registry: dict | None = None) -> fx.GraphModule:
    """Replace each stack in `gm` by a `ReversibleStack` submodule call.

    Stand-alone adapters (MEFT1's G, MEFT2's F) are taken from / added to `registry` by name.
    """
    registry = {} if registry is None else registry
    single = len(analysis.stacks) == 1
    for si, stack in enumerate(analysis.stacks):
        cut = _StackCutter(gm, stack, config, registry, "" if single else f"s{si}_")
        couplings = [cut.coupling(layer, li, li == len(stack.layers) - 1) for li, layer in enumerate(stack.layers)]
        mod = ReversibleStack(couplings, len(cut.context), config.spec.output_stream(config.output),
                              reversible=config.reversible, has_random=cut.has_random,
                              record=StackRecord(stack.owner, config.method, cut.dim), numerics=config.numerics,
                              frac_bits=config.streams[1], stream_bits=config.streams[0])
        name = "meft_stack" if single else f"meft_stack_{si}"
        gm.add_submodule(name, mod)
        with gm.graph.inserting_after(cut.end):
            call = stamp(gm.graph.call_module(name, (cut.start, *cut.context)), PASS)
        call.meta.update({k: cut.end.meta[k] for k in ("val", "tensor_meta") if k in cut.end.meta})
        cut.end.replace_all_uses_with(call)
        _erase(gm, cut.region, keep=call)
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
