"""Find linear layers in every layout the captured graphs use.

Rules (before → site):
    linear-aten      aten.linear(x, W, b?)                       W stored (out, in)
    addmm-in-out     aten.addmm(b, x2d, W)                       W stored (in, out): HF GPT-2 Conv1D
    addmm-t          aten.addmm(b, x2d, aten.t|permute(W))       decomposed linear, W stored (out, in)
    mm-t             aten.mm(x2d, aten.t|permute(W))             decomposed linear without bias
    mm-in-out        aten.mm(x2d, W)                             W stored (in, out)

The weight must be a stored tensor (a get_attr node); an activation @ activation product is not a layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from ..ir import get_attr_value

aten = torch.ops.aten
LINEAR_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default)


@dataclass
class LinearSite:
    """One matched linear layer. `x` and `bias` are read from the node's arguments when asked for, not kept:
    rewriting an earlier layer replaces the node this one reads (two linears in a row), and a stale reference
    would point at an erased node."""

    node: fx.Node                 # the op computing x·Wᵀ (+ b)
    rule: str                     # which rule matched (see module docstring)
    x_index: int                  # position of the input activation in node.args
    weight: fx.Node               # get_attr node of the stored weight
    bias_index: int | None        # position of the bias in node.args (-1: the "bias" kwarg), or None
    layout: Literal["out_in", "in_out"]
    in_features: int
    out_features: int

    @property
    def x(self) -> fx.Node:
        """The input activation, as the graph has it now."""
        return self.node.args[self.x_index]

    @property
    def bias(self):
        """The bias argument (a get_attr node, any node, or None), as the graph has it now."""
        if self.bias_index is None:
            return None
        if self.bias_index < 0:
            return self.node.kwargs.get("bias")
        return self.node.args[self.bias_index] if len(self.node.args) > self.bias_index else None

    @property
    def weight_name(self) -> str:
        return self.weight.target

    @property
    def name(self) -> str:
        """The layer's qualified name: the weight's name without its last component ("blocks.0.fc"); a weight
        held at the root of the model (a model that is one nn.Linear) names its layer by itself ("weight")."""
        return self.weight.target.rsplit(".", 1)[0] if "." in self.weight.target else self.weight.target

    def tensor_name(self, suffix: str) -> str:
        """Where a pass stores a new tensor of this layer: "<layer>.<suffix>" beside the weight, or
        "<weight>_<suffix>" at the root when the weight has no owning submodule (it cannot own attributes)."""
        return layer_tensor_name(self.weight.target, suffix)

    def weight_tensor(self, gm: fx.GraphModule) -> torch.Tensor:
        return get_attr_value(gm, self.weight.target)

    def weight_out_in(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight as (out, in), whatever its storage layout (a view, not a copy)."""
        w = self.weight_tensor(gm)
        return w if self.layout == "out_in" else w.t()

    def bias_tensor(self, gm: fx.GraphModule) -> torch.Tensor | None:
        if self.bias is not None and self.bias.op == "get_attr":
            return get_attr_value(gm, self.bias.target)
        return None


def layer_tensor_name(weight_name: str, suffix: str) -> str:
    """The name of a new tensor belonging to the layer whose weight is `weight_name` (see LinearSite.tensor_name)."""
    if "." in weight_name:
        return f"{weight_name.rsplit('.', 1)[0]}.{suffix}"
    return f"{weight_name}_{suffix}"


def _transposed_weight(node) -> fx.Node | None:
    """W when node is aten.t(W) / aten.permute(W, [1, 0]) / aten.transpose(W, 0, 1) of a get_attr."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in (aten.t.default, aten.numpy_T.default) or (
            node.target == aten.permute.default and list(node.args[1]) == [1, 0]) or (
            node.target == aten.transpose.int and sorted(int(a) % 2 for a in node.args[1:3]) == [0, 1]):
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            return src
    return None


def _is_weight(node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    value = node.meta.get("val")
    return value is None or getattr(value, "ndim", 0) == 2


def match_linear(node: fx.Node) -> LinearSite | None:
    """A LinearSite if `node` computes a linear layer with a stored weight, else None."""
    if node.op != "call_function" or node.target not in LINEAR_OPS:
        return None
    if node.target == aten.linear.default:
        w = node.args[1]
        bias_index = 2 if len(node.args) > 2 else (-1 if "bias" in node.kwargs else None)
        if not _is_weight(w):
            return None
        out_f, in_f = _shape(w)
        return LinearSite(node, "linear-aten", 0, w, bias_index, "out_in", in_f, out_f)
    if node.target == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
            return None
        w = node.args[2]
        x_index, bias_index, rule, layout = 1, 0, "addmm-in-out", "in_out"
    else:
        w = node.args[1]
        x_index, bias_index, rule, layout = 0, None, "mm-in-out", "in_out"
    wt = _transposed_weight(w)
    if wt is not None:
        out_f, in_f = _shape(wt)
        return LinearSite(node, rule.replace("in-out", "t"), x_index, wt, bias_index, "out_in", in_f, out_f)
    if not _is_weight(w):
        return None
    in_f, out_f = _shape(w)
    return LinearSite(node, rule, x_index, w, bias_index, layout, in_f, out_f)


def _shape(node: fx.Node) -> tuple[int, int]:
    value = node.meta.get("val")
    if value is None:
        gm_value = node.graph.owning_module
        value = get_attr_value(gm_value, node.target)
    return tuple(int(s) for s in value.shape)


def find_linears(gm: fx.GraphModule, targets: str | None = None, exclude: str | None = None) -> list[LinearSite]:
    """Every linear site in graph order; `targets` / `exclude` are regexes searched in the layer name."""
    sites = []
    for node in gm.graph.nodes:
        site = match_linear(node)
        if site is None:
            continue
        if targets and not re.search(targets, site.name):
            continue
        if exclude and re.search(exclude, site.name):
            continue
        sites.append(site)
    return sites


_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
                 aten.transpose.int, aten.contiguous.default, aten.slice.Tensor, aten.clone.default,
                 aten.to.dtype, aten._to_copy.default, aten.squeeze.dim, aten.unsqueeze.default,
                 aten.log_softmax.int, aten._log_softmax.default, aten.softmax.int, aten._softmax.default}


def feeds_output(node: fx.Node) -> bool:
    """True when `node`'s value reaches the graph output through layout-only ops (or a final (log-)softmax)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "output":
                return True
            if user.op == "call_function" and (user.target in _PASS_THROUGH or getattr(user.target, "__name__", "")
                                               == "getitem"):
                todo.append(user)
    return False


def is_lm_head(gm: fx.GraphModule, site: LinearSite) -> bool:
    """A layer mapping hidden states to vocabulary logits: its weight is an embedding table (tied head), or it
    produces a graph output and is as wide as an embedding table with more rows than the hidden size."""
    weight = site.weight_tensor(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default:
            table_node = node.args[0]
            if isinstance(table_node, fx.Node) and table_node.op == "get_attr":
                table = get_attr_value(gm, table_node.target)
                if table is weight:
                    return True
                if table.shape[0] == site.out_features > site.in_features and feeds_output(site.node):
                    return True
    return False
