"""The graph passes of meft_fx, in pipeline order. Each is a function of a GraphModule.

    hoist_shape_queries  → sizes are read from graph inputs
    dropout_to_modules   → dropout obeys train()/eval()
    find_residual_units  → (analysis) stacks of x + f(x) sub-blocks on the residual stream
    group_layers         → (analysis) attention unit(s) + FFN unit = one layer
    insert_adapters      → paper adapters in every layer
    build_couplings      → each stack becomes one ReversibleStack call
"""
from .blocks import Layer, ResidualUnit, Stack, StreamAnalysis
from .build_couplings import build_couplings
from .dropout_to_modules import dropout_to_modules
from .find_residual_units import find_residual_units
from .group_layers import group_layers
from .hoist_shape_queries import hoist_shape_queries
from .insert_adapters import insert_adapters

__all__ = [
    "Layer", "ResidualUnit", "Stack", "StreamAnalysis",
    "hoist_shape_queries", "dropout_to_modules", "find_residual_units", "group_layers",
    "insert_adapters", "build_couplings",
]
