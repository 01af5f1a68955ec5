"""Capture: a module and example inputs → a GraphModule taking the call's tensors.

    inputs      normalize_inputs / default_inputs (a transformers model's dummy inputs)
    call_spec   CallSpec: the structure of a call, the key of a captured variant
    tracing     capture(): torch.export (non-strict, dynamic sizes), falling back to torch.fx
"""
from .call_spec import CallSpec
from .inputs import default_inputs, is_transformers_model, normalize_inputs
from .tracing import capture, module_mode, serves

__all__ = ["CallSpec", "capture", "default_inputs", "is_transformers_model", "module_mode", "normalize_inputs", "serves"]
