"""`two-pass-softmax` — replace every softmax by the two-pass (mantissa, exponent) algorithm of Dukhan &
Ablavatski (see rewriter/ops/two_pass_softmax.py for the math and its precision bound).

Graph, before → after:

    y = aten.softmax.int(x, dim)                 y = rewrite.two_pass_softmax(x, dim)          rule "softmax"
    y = aten.softmax.int(x, dim, dtype)          y = rewrite.two_pass_softmax(aten.to(x, dtype), dim)
    y = aten._softmax(x, dim, half_to_float)     y = rewrite.two_pass_softmax(aten.to(x, fp32), dim)   (when set)

Every softmax is rewritten, inside attention or not. Contract: exact — ≤ 1 ulp of the output dtype elementwise
against a float64 softmax for fp32/fp16/bf16 (computed in float64 internally and rounded once; see
rewriter/ops/two_pass_softmax.py for why fp32 mantissas cannot promise 4 ulp), −∞ entries give 0, an
all −∞ row gives NaN exactly as torch.softmax does (the safe choice of zeros would change the function), a
length-1 row gives 1. Each site records the max relative error against torch.softmax on the example inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rewriter.ir import insert_call, replace_node
from rewriter.ops import two_pass_softmax as op
from rewriter.pass_base import Contract, Pass

aten = torch.ops.aten
SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default)


def _site_error(x: torch.Tensor, dim: int, want: torch.Tensor) -> float:
    got = op.reference(x, dim).double()
    want = want.double()
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    err = (got - want).abs()[finite] / want.abs()[finite].clamp_min(torch.finfo(x.dtype).tiny)
    return float(err.max())


@dataclass(frozen=True)
class TwoPassSoftmaxPass(Pass):
    name = "two-pass-softmax"
    contract = Contract.EXACT
    target_ops = SOFTMAX_OPS
    summary = "softmax → two-pass (mantissa, exponent) softmax (Dukhan & Ablavatski); correctly rounded (≤ 1 ulp of float64)"

    def run(self, ctx) -> None:
        gm = ctx.gm
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS]
        values = ctx.activations(nodes + [n.args[0] for n in nodes])
        for node in ctx.progress(nodes, "softmax"):
            x, dim = node.args[0], int(node.args[1])
            out = node.meta.get("val")
            in_val = x.meta.get("val") if hasattr(x, "meta") else None
            if not isinstance(out, torch.Tensor) or not isinstance(in_val, torch.Tensor):
                ctx.skip(node.name, "no shape information on the softmax or its input")
                continue
            if not out.dtype.is_floating_point:
                ctx.skip(node.name, f"softmax of dtype {out.dtype} is not supported")
                continue
            rule = "softmax"
            if in_val.dtype != out.dtype:  # softmax(x, dim, dtype=…) or _softmax(half_to_float=True)
                x = insert_call(gm, node, aten.to.dtype, (x, out.dtype), pass_name=self.name, rule="cast-input")
                rule = "softmax-cast"
            dim = dim % max(out.dim(), 1)
            new = insert_call(gm, node, op.OP, (x, dim), pass_name=self.name, rule=rule, replaces=node)
            new.meta["val"] = out
            figures = {"shape": list(out.shape), "dtype": str(out.dtype).replace("torch.", "")}
            x_value, y_value = values.get(node.args[0]), values.get(node)
            if isinstance(x_value, torch.Tensor) and isinstance(y_value, torch.Tensor):
                figures["max_rel_error_vs_torch"] = _site_error(x_value.to(out.dtype), dim, y_value)
            replace_node(gm, node, new)
            ctx.site(node.name, **figures)
