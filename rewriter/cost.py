"""Costs as formulas: FLOPs and parameter counts of a program, as sympy expressions when shapes are dynamic.

FLOPs count a multiply-add as 2. Ops without a rule count as 0 (pointwise ops are memory-bound; their cost is
not what these rewrites change). Custom ops of this package bring their own `flops(node)`.
"""
from __future__ import annotations

import math
from collections import Counter

import sympy
import torch
from torch import fx

from . import ops as custom_ops
from .ir import op_name

aten = torch.ops.aten


def to_sympy(value):
    """int / SymInt / product thereof -> int or sympy expression."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_number else expr
    if isinstance(value, sympy.Basic):
        return int(value) if value.is_number else value
    return value


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def node_flops(node: fx.Node):
    """FLOPs of one call_function node (0 when unknown)."""
    target = node.target
    out = _shape(node)
    if target in (aten.linear.default,):
        w = _shape(node.args[1])
        x = _shape(node.args[0])
        if w is None or x is None:
            return 0
        return 2 * _prod(x[:-1]) * w[0] * w[1]
    if target in (aten.addmm.default, aten.mm.default):
        a = _shape(node.args[-2])
        b = _shape(node.args[-1])
        if a is None or b is None:
            return 0
        return 2 * a[0] * a[1] * b[1]
    if target in (aten.bmm.default, aten.baddbmm.default):
        a = _shape(node.args[-2])
        b = _shape(node.args[-1])
        if a is None or b is None:
            return 0
        return 2 * a[0] * a[1] * a[2] * b[2]
    if target in (aten.matmul.default,):
        a = _shape(node.args[0])
        if a is None or out is None or len(a) == 0:
            return 0
        return 2 * _prod(out) * a[-1]
    if target in (aten.scaled_dot_product_attention.default,):
        q = _shape(node.args[0])
        v = _shape(node.args[2])
        if q is None or v is None:
            return 0
        # QKᵀ and AV: 2·B·H·Tq·Tk·(d + dv)
        tk = _shape(node.args[1])[-2]
        return 2 * _prod(q[:-1]) * tk * (q[-1] + v[-1])
    if target in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int):
        return 5 * _prod(out) if out is not None else 0
    module = custom_ops.module_for(target)
    if module is not None and hasattr(module, "flops"):
        try:
            return module.flops(node)
        except Exception:  # a malformed node must not break a report
            return 0
    return 0


def program_flops(gm: fx.GraphModule):
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            total = total + node_flops(node)
    return simplify(total)


def program_params(gm: fx.GraphModule) -> dict[str, int]:
    """Counts of distinct tensors (tied weights once): trainable params, frozen params, buffers, and bytes."""
    seen: set[int] = set()
    counts = Counter()
    for _, p in gm.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts["params"] += p.numel()
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        counts["bytes"] += p.numel() * p.element_size()
    for _, b in gm.named_buffers():
        if id(b) in seen:
            continue
        seen.add(id(b))
        counts["buffers"] += b.numel()
        counts["bytes"] += b.numel() * b.element_size()
    return dict(counts)


def op_counts(gm: fx.GraphModule) -> Counter:
    return Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")


def simplify(expr):
    expr = to_sympy(expr)
    if isinstance(expr, sympy.Basic):
        expr = sympy.expand(expr)
        return int(expr) if expr.is_number else expr
    return expr


def format_count(value) -> str:
    """1234567 -> '1.23M'; sympy expressions are printed as formulas."""
    value = simplify(value)
    if isinstance(value, sympy.Basic):
        return str(value)
    value = float(value)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}" if math.isfinite(value) else str(value)
