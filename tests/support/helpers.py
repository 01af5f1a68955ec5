"""Capture a model the way convert does, for pass-level tests."""
import torch

from meft_fx import passes
from meft_fx.capture import capture, normalize_inputs


def captured(model, inputs=None, *, prepare=True):
    """(GraphModule, tensors) of the whole model; with `prepare`, shape hoisting + dropout modules applied."""
    args, kwargs = normalize_inputs(model, inputs)
    gm, spec = capture(model, args, kwargs, "export")
    if prepare:
        gm = passes.run_pipeline(gm, until="dropout_to_modules").gm
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return gm, tensors


def node_values(gm, tensors, names):
    """Values of the named nodes when running gm on tensors."""
    want, out = set(names), {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in want:
                out[n.name] = v
            return v

    Recorder(gm).run(*tensors)
    return out


def layer_outputs(layers, model, inputs):
    """Eager outputs of each module in `layers` for model(**inputs) (first tensor of tuple outputs)."""
    outs = []
    hooks = [l.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for l in layers]
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return outs
