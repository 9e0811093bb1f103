"""Helpers on the working IR: an unlifted `torch.fx.GraphModule` (from `ExportedProgram.module()`).

Parameters and buffers are `get_attr` nodes whose target is a dotted qualified name ("blocks.0.mlp.fc1.weight").
The editing helpers (`insert_call`, `replace_node`) tag every node they make with the pass and rule that made it,
which is what the diff shows.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import fx

PROVENANCE_KEY = "rewrite"


def get_attr_value(gm: fx.GraphModule, qualname: str):
    """The tensor (or module) at a dotted name, e.g. "blocks.0.fc.weight"."""
    obj = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def owner_and_attr(gm: fx.GraphModule, qualname: str) -> tuple[torch.nn.Module, str]:
    """(module that owns the attribute, attribute name) for a dotted name."""
    *path, attr = qualname.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def node_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node (through `aten.t`/`permute` views is the matcher's job); else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def compute_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """call_function nodes (the ops), skipping export's guard helper calls."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            yield node


def op_name(node: fx.Node) -> str:
    """Short readable op name: "aten.linear", "rewrite.lora_linear", "getitem"."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        return f"{ns}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def fake_value(node) -> torch.Tensor | None:
    """The FakeTensor recorded on a node by export / FakeTensorProp, if any."""
    if isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def tag(node: fx.Node, pass_name: str, rule: str, replaces: str | None = None, calibrated: bool = False) -> fx.Node:
    """Record which pass and rule made `node` (and which node it replaces) for the diff; `calibrated`: its tensors
    were fitted to calibration data (what heal's default mode reads)."""
    node.meta[PROVENANCE_KEY] = {"pass": pass_name, "rule": rule, "replaces": replaces}
    if calibrated:
        node.meta[PROVENANCE_KEY]["calibrated"] = True
    return node


def provenance(node: fx.Node) -> dict | None:
    return node.meta.get(PROVENANCE_KEY)


def insert_call(gm: fx.GraphModule, before: fx.Node, target, args: tuple, *, pass_name: str, rule: str,
                replaces: fx.Node | None = None, kwargs: dict | None = None, calibrated: bool = False) -> fx.Node:
    """Insert `target(*args)` before `before`, tagged with its provenance."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, tuple(args), kwargs or {})
    return tag(node, pass_name, rule, replaces.name if replaces is not None else None, calibrated)


def replace_node(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    """Route every user of `old` to `new` and erase `old`."""
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
