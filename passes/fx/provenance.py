"""Who made a node (the pass stamped on `node.meta`) and which source module it came from."""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx

from meft_fx.runtime.codegen import PROVENANCE_KEY


def stamp(node: fx.Node, pass_name: str) -> fx.Node:
    """Record on `node.meta` which pass created it (shown by `meft_fx.graphs`)."""
    node.meta[PROVENANCE_KEY] = pass_name
    return node


def replace_node(gm: fx.GraphModule, old: fx.Node, op: str, target, args: tuple, pass_name: str) -> fx.Node:
    """Put a new `op` node (call_function / call_module) where `old` was: same meta, stamped, old erased."""
    with gm.graph.inserting_before(old):
        new = gm.graph.create_node(op, target, args)
    new.meta = dict(old.meta)
    stamp(new, pass_name)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def module_paths(node: fx.Node) -> list:
    """Source module paths of a node, outermost first (from torch.export's nn_module_stack)."""
    return [path for path, _ in _module_calls(node)]


def _module_calls(node: fx.Node) -> list:
    """(path, call) per source module of a node, outermost first; `call` tells apart the calls of one
    module (torch.export keys a module's second call "...@1"), so two calls of a shared layer differ."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, v in stack.items():
        path = v[0] if isinstance(v, tuple) else v
        if isinstance(path, str):
            # meft_fx.capture calls the traced module through a wrapper whose child is `mod`.
            if path == "mod" or path == "":
                continue
            call = str(key).rpartition("@")[2] if "@" in str(key) else "0"
            out.append((path[4:] if path.startswith("mod.") else path, call))
    if not out and node.op == "call_module":
        parts = str(node.target).split(".")
        out = [(".".join(parts[: i + 1]), "0") for i in range(len(parts) - 1)]
    return out


def common_module(nodes: Iterable[fx.Node]) -> str:
    """Deepest source module path shared by all the nodes, within one call of it ("" = the root module):
    nodes of two calls of one shared layer have the module that makes both calls in common."""
    common = None
    for n in nodes:
        calls = _module_calls(n)
        if not calls and n.op not in ("call_module",):
            continue
        if common is None:
            common = calls
        else:
            k = 0
            while k < min(len(common), len(calls)) and common[k] == calls[k]:
                k += 1
            common = common[:k]
    return common[-1][0] if common else ""


def module_parts(nodes: Iterable[fx.Node], module: str) -> tuple:
    """Child modules of `module` that the nodes come from, in order of first appearance."""
    parts = []
    depth = len(module.split(".")) if module else 0
    for n in nodes:
        for p in module_paths(n):
            if (not module or p.startswith(module + ".")) and len(p.split(".")) == depth + 1:
                child = p.split(".")[-1]
                if child not in parts:
                    parts.append(child)
    return tuple(parts)


def describe(node: fx.Node) -> str:
    try:
        return node.format_node()
    except Exception:  # pragma: no cover - format_node is best effort
        return node.name
