"""Every layer carries the paper's adapters: parallel to the FFN, and (MEFT3) after attention.

Parallel adapter: the FFN branch b becomes b + A(u), u being the FFN's input (the activation that
feeds its first projection); in a parallel-residual layer (x + attn(x) + ffn(x)) b is the sum of both terms. Sequential adapter (MEFT3 only, per attention block): the attention
branch b becomes b + A(b), just before the residual add. New nodes are stamped with this pass.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from meft_fx.nn.adapter import ADAPTER_PREFIX, Adapter
from ..fx.dataflow import data_dag, node_value, region, tensor_shape, topo
from ..fx.ops import is_linear, is_shape_only, linear_input
from ..fx.provenance import describe, stamp
from ..analysis.records import StreamAnalysis

PASS = "insert_adapters"
aten = torch.ops.aten


def _ffn_input(gm, dag, start: fx.Node, branch_out: fx.Node) -> fx.Node:
    """The input of the FFN's first projection, walked back through reshapes to the stream's shape."""
    shape = tensor_shape(start)
    for n in topo(gm, region(dag, start, branch_out)):
        if is_linear(gm, n):
            u = linear_input(gm, n)
            while isinstance(u, fx.Node) and tensor_shape(u) != shape and is_shape_only(u):
                u = u.args[0]
            if isinstance(u, fx.Node) and tensor_shape(u) == shape:
                return u
            break
    return start


def _add_adapter(gm, config, name: str, source: fx.Node, branch_out: fx.Node, residual_add: fx.Node, registry: dict):
    v = node_value(branch_out)
    shape = tensor_shape(branch_out)
    if not shape or not isinstance(shape[-1], int):
        raise ValueError(f"[{PASS}] cannot size an adapter for {describe(branch_out)}: hidden size is not static "
                         f"(shape {shape}); convert with example inputs whose last dimension is fixed")
    dtype, device = getattr(v, "dtype", None), getattr(v, "device", None)
    if device is not None and device.type == "meta":
        device = None
    if name not in registry:
        registry[name] = Adapter(int(shape[-1]), config.adapter_rank, config.adapter_activation,
                                 config.adapter_dropout, config.adapter_init_std, dtype=dtype, device=device)
    gm.add_submodule(name, registry[name])
    with gm.graph.inserting_after(branch_out):
        a = stamp(gm.graph.call_module(name, (source,)), PASS)
    with gm.graph.inserting_after(a):
        nb = stamp(gm.graph.call_function(aten.add.Tensor, (branch_out, a)), PASS)
    for key in ("val", "tensor_meta"):
        if key in branch_out.meta:
            a.meta[key] = nb.meta[key] = branch_out.meta[key]
    a.meta["nn_module_stack"] = nb.meta["nn_module_stack"] = dict(branch_out.meta.get("nn_module_stack", {}))
    residual_add.replace_input_with(branch_out, nb)


def insert_adapters(gm: fx.GraphModule, analysis: StreamAnalysis, config, registry: dict | None = None) -> fx.GraphModule:
    """Insert adapter submodules (named `meft_adapter_*`) into every layer of every stack.

    `registry` maps adapter names to modules: an adapter already there is reused (so a module
    re-captured for another call signature trains the same adapters); new ones are added to it.
    """
    registry = {} if registry is None else registry
    dag = data_dag(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    plans = []
    for si, stack in enumerate(analysis.stacks):
        tag = f"s{si}_" if len(analysis.stacks) > 1 else ""
        for li, layer in enumerate(stack.layers):
            if config.spec.attention_adapter:
                for ai, u in enumerate(layer.attention):
                    b = nodes[u.branch_out]
                    plans.append((f"{ADAPTER_PREFIX}_{tag}{li}_attn{ai}", b, b, nodes[u.add]))
            u = layer.ffn  # a parallel layer's adapter reads its FFN term's input, adds to the whole branch
            src = _ffn_input(gm, dag, nodes[u.start], nodes[u.position_wise or u.branch_out])
            plans.append((f"{ADAPTER_PREFIX}_{tag}{li}_ffn", src, nodes[u.branch_out], nodes[u.add]))
    for name, src, b, add in plans:
        _add_adapter(gm, config, name, src, b, add, registry)
    gm.graph.lint()
    gm.recompile()
    return gm
