"""`rewrite::blockdiag_linear` — block-diagonal linear, optionally followed by a dense matrix (BlockDense).

    blocks: (b, t, p)      V_b = diag(V_1 … V_b), block k maps x[k·p:(k+1)·p] (x zero-padded to b·p) to t values
    dense_u: (m, b·t)      U_r (BlockDense) or None (plain block-diagonal)

    plain       y[k·t + j] = Σ_p blocks[k, j, p] · x[k·p + p]          output b·t truncated to `out_features`
    BlockDense  y = U_r · (V_b · x)                                       (StructuredFFN's BlockDense)

Parameters b·t·p (+ m·b·t); FLOPs 2·N·b·t·p (+ 2·N·m·b·t).
Pre-merge: `dense` (out, in) holds the product; used when the rows of x are ≤ `threshold` (chosen inside the op,
so export sees no shape branch); gradients always flow through the factors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _blocks_apply(x2: torch.Tensor, blocks: torch.Tensor):
    """(a, h): a = x blocks (b, N, p) (strided view), h = V_b·x as (N, b·t)."""
    b, t, p = blocks.shape
    n_rows, n_in = x2.shape
    if n_in < b * p:
        x2 = F.pad(x2, (0, b * p - n_in))
    a = x2.view(n_rows, b, p).transpose(0, 1)
    h = torch.bmm(a, blocks.transpose(1, 2))                  # (b, N, t)
    return a, h.transpose(0, 1).reshape(n_rows, b * t)


def reference(x, blocks, dense_u=None, bias=None, out_features=None, dense=None, threshold=0):
    lead = x.shape[:-1]
    if dense is not None and _rows(x) <= threshold:
        return F.linear(x, dense, bias)
    x2 = x.reshape(-1, x.shape[-1])
    _, h = _blocks_apply(x2, blocks)
    if dense_u is not None:
        y = F.linear(h, dense_u, bias)
    else:
        m = int(out_features) if out_features is not None else h.shape[1]
        y = h[:, :m] if h.shape[1] != m else h
        if bias is not None:
            y = y + bias
    return y.reshape(*lead, y.shape[-1])


@torch.library.custom_op("rewrite::blockdiag_linear", mutates_args=())
def blockdiag_linear(x: torch.Tensor, blocks: torch.Tensor, dense_u: torch.Tensor | None, bias: torch.Tensor | None,
                     out_features: int, dense: torch.Tensor | None = None, threshold: int = 0) -> torch.Tensor:
    return reference(x, blocks, dense_u, bias, out_features, dense, threshold).contiguous()


@blockdiag_linear.register_fake
def _(x, blocks, dense_u, bias, out_features, dense=None, threshold=0):
    return x.new_empty(*x.shape[:-1], out_features)


def _setup_context(ctx, inputs, output):
    x, blocks, dense_u, bias, out_features, dense, threshold = inputs
    ctx.save_for_backward(x, blocks, dense_u)
    ctx.has_bias = bias is not None
    ctx.has_u = dense_u is not None


def _backward(ctx, grad):
    x, blocks, dense_u = ctx.saved_tensors
    b, t, p = blocks.shape
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    n_rows = x2.shape[0]
    g2 = grad.reshape(n_rows, -1)
    a, h = _blocks_apply(x2, blocks)
    grad_u = None
    if ctx.has_u:
        grad_u = g2.t() @ h if ctx.needs_input_grad[2] else None
        dh = g2 @ dense_u                                       # (N, b·t)
    else:
        dh = F.pad(g2, (0, b * t - g2.shape[1])) if g2.shape[1] < b * t else g2
    dh = dh.view(n_rows, b, t).transpose(0, 1)                  # (b, N, t)
    grad_blocks = torch.bmm(dh.transpose(1, 2), a) if ctx.needs_input_grad[1] else None
    grad_x = None
    if ctx.needs_input_grad[0]:
        da = torch.bmm(dh, blocks)                               # (b, N, p)
        grad_x = da.transpose(0, 1).reshape(n_rows, b * p)[:, :n_in].reshape(x.shape)
    grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, grad_blocks, grad_u, grad_bias, None, None, None


blockdiag_linear.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.blockdiag_linear.default


def flops(node):
    """2·N·b·t·p (+ 2·N·m·b·t with U_r), or 2·N·n·m on the pre-merged dense path."""
    x, blocks = node.args[0].meta["val"], node.args[1].meta["val"]
    dense_u = node.args[2]
    dense = node.args[5] if len(node.args) > 5 else node.kwargs.get("dense")
    threshold = node.args[6] if len(node.args) > 6 else node.kwargs.get("threshold", 0)
    rows = x.numel() // x.shape[-1]
    if dense is not None and rows <= threshold:
        d = dense.meta["val"]
        return 2 * rows * d.shape[0] * d.shape[1]
    b, t, p = blocks.shape
    total = 2 * rows * b * t * p
    if dense_u is not None:
        total += 2 * rows * dense_u.meta["val"].shape[0] * b * t
    return total
