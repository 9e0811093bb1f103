"""`rewrite::lowrank_linear` — a linear layer with a factored weight W ≈ U·V.

    y = (x·Vᵀ)·Uᵀ + b          U: (out, r), V: (r, in)

Parameters r·(in + out); FLOPs 2·N·r·(in + out).
Pre-merge (StructuredFFN): `dense` (out, in) holds U·V; when the rows of x are ≤ `threshold` the op computes
x·denseᵀ + b (chosen inside the opaque op, so export sees no shape branch); gradients always flow through U and V.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def reference(x, u, v, bias=None, dense=None, threshold=0):
    if dense is not None and _rows(x) <= threshold:
        return F.linear(x, dense, bias)
    return F.linear(F.linear(x, v), u, bias)


@torch.library.custom_op("rewrite::lowrank_linear", mutates_args=())
def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   dense: torch.Tensor | None = None, threshold: int = 0) -> torch.Tensor:
    return reference(x, u, v, bias, dense, threshold).contiguous()


@lowrank_linear.register_fake
def _(x, u, v, bias, dense=None, threshold=0):
    return x.new_empty(*x.shape[:-1], u.shape[0])


def _setup_context(ctx, inputs, output):
    x, u, v, bias, dense, threshold = inputs
    ctx.save_for_backward(x, u, v)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, u, v = ctx.saved_tensors
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad.reshape(-1, grad.shape[-1])
    gu = g2 @ u                                             # (N, r)
    grad_x = (gu @ v).reshape(x.shape) if ctx.needs_input_grad[0] else None
    grad_u = g2.t() @ (x2 @ v.t()) if ctx.needs_input_grad[1] else None
    grad_v = gu.t() @ x2 if ctx.needs_input_grad[2] else None
    grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, grad_u, grad_v, grad_bias, None, None


lowrank_linear.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.lowrank_linear.default


def flops(node):
    """2·N·r·(in + out), or 2·N·in·out on the pre-merged dense path."""
    x, u, v = (node.args[i].meta["val"] for i in range(3))
    dense = node.args[4] if len(node.args) > 4 else node.kwargs.get("dense")
    threshold = node.args[5] if len(node.args) > 5 else node.kwargs.get("threshold", 0)
    rows = x.numel() // x.shape[-1]
    if dense is not None and rows <= threshold:
        return 2 * rows * u.shape[0] * v.shape[1]
    return 2 * rows * u.shape[1] * (u.shape[0] + v.shape[1])
