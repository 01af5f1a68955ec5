"""meft_fx: make a pretrained transformer reversible (MEFT, NeurIPS 2023) with a graph-rewriting pass.

    rev = meft_fx.convert(model)                 # MEFT3, exact numerics by default
    rev(**batch).loss.backward()                 # backward rebuilds activations
    print(meft_fx.explain(rev))

The top level holds the verbs and the config; everything else lives in its subpackage: capture
(tracing), passes (the graph passes, one PIPELINE), runtime (the reversible stack), nn (adapter,
dropout, attention), inspection, checkpoint, compilation. Names are imported on first use, so
`import meft_fx` (and `python -m meft_fx --help`) does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name → the module that defines it
_EXPORTS = {
    "convert": "conversion", "MEFTConfig": "config",
    "explain": "inspection.explain", "Explanation": "inspection.explain",
    "graphs": "inspection.graphs", "show": "inspection.graphs", "to_networkx": "inspection.networkx_view",
    "draw": "inspection.draw", "debug_node": "inspection.debug_node",
    "save_adapters": "checkpoint", "load_adapters": "checkpoint", "adapter_config": "checkpoint",
    "from_pretrained": "conversion", "trainable_parameters": "conversion", "print_trainable_parameters": "conversion",
    "chunk_loss": "chunked_loss", "linear_cross_entropy": "nn.head_loss",
    "compile": "compilation", "compile_couplings": "compilation", "compiled_couplings": "compilation",
    "ConversionError": "errors", "CaptureError": "errors", "ReconstructionError": "errors",
    "AdapterMismatchError": "errors",
    "shard": "distributed",
}

# `compile` is reachable as meft_fx.compile but not through `import *` (it would replace the builtin).
__all__ = [name for name in _EXPORTS if name != "compile"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meft_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
