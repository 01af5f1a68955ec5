"""The one ordered pipeline every caller runs (convert, re-captures, `graphs()`, debug_node, the tests).

Like torch.fx's PassManager: each pass is a callable of the GraphModule (and the pipeline's
state); after each transform the graph is linted, nodes the pass created are stamped with its
name (`node.meta["meft_pass"]`), and a printable snapshot is kept under the pass's name.
Analysis passes return records (`StreamAnalysis`) instead; when no stack is found, the
transforms that need one are not run. A new pass is one file plus one line in PIPELINE.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from .analysis.find_residual_units import find_residual_units
from .analysis.group_layers import group_layers
from .analysis.records import StreamAnalysis
from meft_fx.config import LayerShape
from meft_fx.nn.experts import grouped_mm
from meft_fx.nn.gated import gated_act

from .fx.dataflow import data_dag, region
from .fx.ops import TOPK_TARGETS
from .fx.provenance import PROVENANCE_KEY
from .transforms.build_couplings import build_couplings
from .transforms.causal_masks import causal_masks
from .transforms.chunk_head_loss import chunk_head_loss
from .transforms.dropout_to_modules import dropout_to_modules
from .transforms.gated_activation import gated_activation
from .transforms.grouped_experts import grouped_experts
from .transforms.hoist_shape_queries import hoist_shape_queries
from .transforms.insert_adapters import insert_adapters
from .transforms.unrepeat_kv import unrepeat_kv

__all__ = ["Pass", "PIPELINE", "PASS_NAMES", "PipelineState", "PipelineResult", "run_pipeline", "snapshot",
           "parallel_layers", "layer_shape"]


@dataclass
class PipelineState:
    """What passes share: the config, the adapter registry (shared by every capture of a module), the analysis."""

    config: object = None
    adapters: dict = field(default_factory=dict)
    analysis: StreamAnalysis | None = None
    method_reason: str = ""  # why the config's method (MEFTConfig.method_reason)


@dataclass(frozen=True)
class Pass:
    """One pipeline step. `kind` "transform" (returns the GraphModule) or "analysis" (returns a StreamAnalysis)."""

    name: str
    kind: str
    run: Callable
    progress: str = ""


PIPELINE = [
    Pass("hoist_shape_queries", "transform", lambda gm, s: hoist_shape_queries(gm)),
    Pass("unrepeat_kv", "transform", lambda gm, s: unrepeat_kv(gm)),
    Pass("dropout_to_modules", "transform", lambda gm, s: dropout_to_modules(gm)),
    Pass("causal_masks", "transform", lambda gm, s: causal_masks(gm)),
    Pass("gated_activation", "transform", lambda gm, s: gated_activation(gm)),
    Pass("grouped_experts", "transform", lambda gm, s: grouped_experts(gm)),
    Pass("find_residual_units", "analysis", lambda gm, s: find_residual_units(gm), "finding the residual stream"),
    Pass("group_layers", "analysis", lambda gm, s: group_layers(s.analysis)),
    Pass("insert_adapters", "transform", lambda gm, s: insert_adapters(gm, s.analysis, s.config, s.adapters)),
    Pass("build_couplings", "transform", lambda gm, s: build_couplings(gm, s.analysis, s.config, s.adapters),
         "building the couplings"),
    Pass("chunk_head_loss", "transform", lambda gm, s: chunk_head_loss(gm, s.config.loss_chunk_bytes)
         if s.config.chunk_loss else gm),
]
PASS_NAMES = tuple(p.name for p in PIPELINE)


@dataclass
class PipelineResult:
    """The rewritten GraphModule, the analysis, and `programs`: the captured graph and one snapshot per transform."""

    gm: fx.GraphModule
    analysis: StreamAnalysis | None
    programs: OrderedDict
    config: object = None   # the config the transforms used (method "auto" resolved for this model)
    method_reason: str = ""  # why that method (MEFTConfig.method_reason)


def snapshot(gm: fx.GraphModule, made_by: str) -> fx.GraphModule:
    """A copy of `gm`'s program (sharing its parameters) labelled with the pass that made it."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    g._codegen = gm.graph._codegen
    snap = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    snap.meta = {PROVENANCE_KEY: made_by}
    return snap


def _stamp_new(gm: fx.GraphModule, made_by: str) -> None:
    for n in gm.graph.nodes:
        if n.op != "output":
            n.meta.setdefault(PROVENANCE_KEY, made_by)


def run_pipeline(gm: fx.GraphModule, config=None, adapters: dict | None = None, *, until: str | None = None,
                 progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Run PIPELINE on a captured GraphModule, up to and including the pass named `until` (default: all).

    Transforms need `config` (a MEFTConfig) from `insert_adapters` on; `adapters` is the registry
    shared by every capture of the same module (new adapters are added to it).
    """
    if until is not None and until not in PASS_NAMES:
        raise ValueError(f"until={until!r}: not a pass of the pipeline ({', '.join(PASS_NAMES)})")
    state = PipelineState(config, {} if adapters is None else adapters)
    made_by = (getattr(gm, "meta", None) or {}).get(PROVENANCE_KEY, "capture")
    _stamp_new(gm, made_by)
    programs = OrderedDict(captured=snapshot(gm, made_by))
    for p in PIPELINE:
        if p.progress and progress is not None:
            progress(p.progress)
        out = p.run(gm, state)
        if p.kind == "analysis":
            state.analysis = out
            if p.name == "group_layers" and state.config is not None:
                shape = layer_shape(gm, out)
                state.method_reason = state.config.method_reason(shape)
                state.config = state.config.resolved(shape)
        else:
            gm = out
            gm.graph.lint()
            _stamp_new(gm, p.name)
            programs[p.name] = snapshot(gm, p.name)
        if p.name == until or (p.kind == "analysis" and not out.stacks):
            break
    return PipelineResult(gm, state.analysis, programs, state.config, state.method_reason)


def parallel_layers(analysis: StreamAnalysis) -> list:
    """Module names of the parallel-residual layers (x + attn(x) + ffn(x)) of the analysis' stacks."""
    return [layer.module or layer.start for st in analysis.stacks for layer in st.layers
            if any(u.kind == "parallel" for u in layer.units)]


def layer_shape(gm: fx.GraphModule, analysis: StreamAnalysis) -> LayerShape:
    """What method="auto" looks at (`meft_fx.config.LayerShape`) in the layers the analysis found in `gm`."""
    units = [u for st in analysis.stacks for u in st.units]
    ffns = [layer.ffn for st in analysis.stacks for layer in st.layers]
    dag, nodes = data_dag(gm), {n.name: n for n in gm.graph.nodes}
    return LayerShape(parallel=tuple(parallel_layers(analysis)),
                      pre_norm=bool(units) and not any(u.post_norm for u in units),
                      routed_experts=any(n.target is grouped_mm or n.target in TOPK_TARGETS for n in gm.graph.nodes),
                      gated_ffn=bool(ffns) and all(any(n.target is gated_act for n in region(
                          dag, nodes[u.entry or u.start], nodes[u.add])) for u in ffns))
