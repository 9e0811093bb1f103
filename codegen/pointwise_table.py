"""Op → Triton expression table for generated kernels (rules as data).

Each rule: the aten overload it handles, `check(node)` -> None when it applies or the reason it does not, and
`expr(args, kw)` -> a Triton expression over fp32 values (args are already expressions: a loaded input, an
earlier value or a literal). Reductions (over the last dim only) are listed separately.

    add.Tensor(a, b, alpha)  -> (a + alpha*b)          gelu(x, approximate)  -> tl_math.gelu_erf / gelu_tanh
    sub.Tensor(a, b, alpha)  -> (a - alpha*b)          where.self(c, a, b)   -> tl.where(c != 0, a, b)
    mul / div                -> (a * b) / (a / b)      masked_fill.Scalar(x, m, v) -> tl.where(m != 0, v, x)
    neg/exp/log/tanh/sigmoid/relu                      maximum/minimum       -> tl.maximum / tl.minimum
    pow.Tensor_Scalar(x, k)  k int in [-8, 8]          -> repeated products (1/… for k < 0)
    sum.dim_IntList / amax / mean.dim over the last dim
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

aten = torch.ops.aten


def literal(v) -> str:
    """A Python scalar as a Triton literal (always float: values in kernels are fp32)."""
    v = float(v)
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


def _alpha(kw) -> str | None:
    a = kw.get("alpha", 1)
    return None if a == 1 else literal(a)


def _pow_expr(a: str, k: int) -> str:
    if k == 0:
        return f"({a} * 0.0 + 1.0)"
    body = " * ".join([f"({a})"] * abs(k))
    return f"({body})" if k > 0 else f"(1.0 / ({body}))"


def _ok(node) -> str | None:
    return None


def _no_alpha_check(node) -> str | None:
    a = node.kwargs.get("alpha", 1)
    return None if isinstance(a, (int, float)) else "non-scalar alpha"


def _div_check(node) -> str | None:
    return None if node.kwargs.get("rounding_mode") is None else "rounding_mode"


def _gelu_check(node) -> str | None:
    return None if node.kwargs.get("approximate", "none") in ("none", "tanh") else "unknown approximation"


def _pow_check(node) -> str | None:
    k = node.args[1]
    if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, float) and k.is_integer())):
        return "non-integer exponent"
    return None if -8 <= int(k) <= 8 else "exponent out of range"


@dataclass(frozen=True)
class Rule:
    name: str
    op: object
    expr: Callable          # (args: list[str], kw: dict) -> str
    check: Callable = _ok   # (node) -> reason | None


def _addsub(sign):
    def f(a, kw):
        al = _alpha(kw)
        return f"({a[0]} {sign} {a[1]})" if al is None else f"({a[0]} {sign} {al} * {a[1]})"
    return f


def _gelu(a, kw):
    fn = "gelu_tanh" if kw.get("approximate", "none") == "tanh" else "gelu_erf"
    return f"tl_math.{fn}({a[0]})"


RULES = [
    Rule("add", aten.add.Tensor, _addsub("+"), _no_alpha_check),   # a + alpha*b -> (a + alpha * b)
    Rule("add_scalar", aten.add.Scalar, _addsub("+"), _no_alpha_check),
    Rule("sub", aten.sub.Tensor, _addsub("-"), _no_alpha_check),   # a - alpha*b -> (a - alpha * b)
    Rule("sub_scalar", aten.sub.Scalar, _addsub("-"), _no_alpha_check),
    Rule("mul", aten.mul.Tensor, lambda a, kw: f"({a[0]} * {a[1]})"),
    Rule("mul_scalar", aten.mul.Scalar, lambda a, kw: f"({a[0]} * {a[1]})"),
    Rule("div", aten.div.Tensor, lambda a, kw: f"({a[0]} / {a[1]})", _div_check),
    Rule("div_scalar", aten.div.Scalar, lambda a, kw: f"({a[0]} / {a[1]})"),
    Rule("neg", aten.neg.default, lambda a, kw: f"(-{a[0]})"),
    Rule("exp", aten.exp.default, lambda a, kw: f"tl.exp({a[0]})"),
    Rule("log", aten.log.default, lambda a, kw: f"tl.log({a[0]})"),
    Rule("tanh", aten.tanh.default, lambda a, kw: f"tl_math.tanh({a[0]})"),
    Rule("sigmoid", aten.sigmoid.default, lambda a, kw: f"tl.sigmoid({a[0]})"),
    Rule("relu", aten.relu.default, lambda a, kw: f"tl.maximum({a[0]}, 0.0)"),
    Rule("gelu", aten.gelu.default, _gelu, _gelu_check),
    Rule("where", aten.where.self, lambda a, kw: f"tl.where({a[0]} != 0, {a[1]}, {a[2]})"),
    Rule("masked_fill", aten.masked_fill.Scalar, lambda a, kw: f"tl.where({a[1]} != 0, {a[2]}, {a[0]})"),
    Rule("maximum", aten.maximum.default, lambda a, kw: f"tl.maximum({a[0]}, {a[1]})"),
    Rule("minimum", aten.minimum.default, lambda a, kw: f"tl.minimum({a[0]}, {a[1]})"),
    Rule("pow", aten.pow.Tensor_Scalar, lambda a, kw: _pow_expr(a[0], int(float(a[1]))), _pow_check),
]
BY_OP = {r.op: r for r in RULES}
BY_NAME = {r.name: r for r in RULES}

# reductions over the last dim: name -> (aten overload, kind)
REDUCTIONS = {aten.sum.dim_IntList: "sum", aten.amax.default: "max", aten.mean.dim: "mean"}
REDUCTION_OPS = {"sum": aten.sum.dim_IntList, "max": aten.amax.default, "mean": aten.mean.dim}


def pointwise_rule(node) -> Rule | None:
    """The rule for a pointwise node, or None when the table does not handle it (this exact form)."""
    if node.op != "call_function":
        return None
    rule = BY_OP.get(node.target)
    if rule is None or rule.check(node) is not None:
        return None
    return rule


def reduction_kind(node) -> str | None:
    """"sum" | "max" | "mean" when `node` reduces over its input's last dim only (no dtype change), else None."""
    if node.op != "call_function" or node.target not in REDUCTIONS:
        return None
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or len(dims) != 1 or dims[0] % val.dim() != val.dim() - 1:
        return None
    if node.kwargs.get("dtype") is not None:
        return None
    return REDUCTIONS[node.target]
