"""The graph passes of meft_fx (installed as `meft_fx.passes`), in pipeline order.

    transforms.hoist_shape_queries  → sizes are read from graph inputs
    transforms.unrepeat_kv          → grouped-query attention reads k/v heads unrepeated (enable_gqa)
    transforms.dropout_to_modules   → dropout obeys train()/eval()
    transforms.causal_masks         → SDPA with a boolean mask takes the causal kernel when the mask is causal
    transforms.gated_activation     → act(a) * b (SwiGLU, GEGLU) keeps two tensors for the backward, not three
    transforms.grouped_experts      → routed experts' grouped products compute only the wanted gradients
    analysis.find_residual_units    → stacks of x + f(x) sub-blocks on the residual stream
    analysis.group_layers           → attention unit(s) + FFN unit, or one parallel unit = one layer
    transforms.insert_adapters      → paper adapters in every layer
    transforms.build_couplings      → each stack becomes one ReversibleStack call; in its FFN halves
      transforms.local_sizes        → the batch/sequence sizes (and tensors made from them) come from the half's input
      transforms.sliced_ffn         → a gated FFN runs in slices of its width, back-propagating as it recomputes
    transforms.chunk_head_loss      → a vocabulary head + cross-entropy in the program runs in chunks

`pipeline.PIPELINE` is the one ordered list; `run_pipeline` runs it (lint, provenance, snapshots).
`fx` holds the helpers the passes share: ops (op taxonomy), dataflow, provenance, extraction.
"""
from .analysis.find_residual_units import find_residual_units
from .analysis.group_layers import group_layers
from .analysis.records import Layer, ResidualUnit, Stack, StreamAnalysis
from .pipeline import PASS_NAMES, PIPELINE, Pass, PipelineResult, layer_shape, parallel_layers, run_pipeline, snapshot
from .transforms.build_couplings import build_couplings
from .transforms.causal_masks import causal_masks
from .transforms.chunk_head_loss import chunk_head_loss, find_head_losses
from .transforms.dropout_to_modules import dropout_to_modules
from .transforms.gated_activation import gated_activation
from .transforms.grouped_experts import grouped_experts
from .transforms.hoist_shape_queries import hoist_shape_queries
from .transforms.insert_adapters import insert_adapters
from .transforms.local_sizes import local_sizes
from .transforms.sliced_ffn import sliced_ffn
from .transforms.unrepeat_kv import unrepeat_kv

__all__ = [
    "Layer", "ResidualUnit", "Stack", "StreamAnalysis", "PIPELINE", "PASS_NAMES", "Pass", "PipelineResult",
    "run_pipeline", "snapshot", "hoist_shape_queries", "unrepeat_kv", "dropout_to_modules", "causal_masks",
    "gated_activation", "grouped_experts", "local_sizes", "sliced_ffn",
    "find_residual_units", "group_layers",
    "insert_adapters", "build_couplings", "chunk_head_loss", "find_head_losses", "parallel_layers", "layer_shape",
]
