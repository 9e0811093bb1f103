"""`rewrite::monarch_linear` — a linear layer whose weight is a Monarch matrix M = P₂·L·P₁·R (Dao et al. 2022).

Layout (that of HazyResearch/fly's `MonarchLinear(nblocks=b)`), x of size n_ext = b·p (zero-padded from n):

    w1: (b, q, p)   R, block-diagonal: block k maps x[k·p:(k+1)·p] to h[k, :q]
    w2: (b, s, q)   L, block-diagonal: block c maps g[c, :] to y_c (s values)

    h[k, j]  = Σ_p w1[k, j, p] · x[k·p + p]                 (b bmm's of (N, p) × (p, q))
    P₁:  flatten h to f = k·q + j, view as (q, b): g[c, i] = h_flat[i·b + c]
    y[c, s'] = Σ_i w2[c, s', i] · g[c, i]
    P₂:  output index o = s'·b + c; truncate m_ext = b·s to `out_features`, add bias.

Parameters q·(n_ext + m_ext); FLOPs 2·N·q·(n_ext + m_ext) against 2·N·n·m dense.

Pre-merge (StructuredFFN): `dense` (out, in) may hold the product; when the number of rows N of x is
≤ `threshold` the op computes x·denseᵀ + b instead (the choice is made here, inside the opaque op, so export never
sees a branch on a shape). Gradients always flow through the factors (dense is a frozen copy of their product).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _perm1(h: torch.Tensor) -> torch.Tensor:
    """P₁: h (b, N, q) indexed [k, n, j] -> g (b, N, q) indexed [c, n, i] with k·q + j = i·b + c."""
    b, n, q = h.shape
    if q % b == 0:  # one copy: j = j1·b + c, i = k·(q/b) + j1
        return h.view(b, n, q // b, b).permute(3, 1, 0, 2).reshape(b, n, q)
    return h.transpose(0, 1).reshape(n, q, b).permute(2, 0, 1).contiguous()


def _perm1_inv(g: torch.Tensor) -> torch.Tensor:
    b, n, q = g.shape
    if q % b == 0:
        return g.view(b, n, b, q // b).permute(2, 1, 3, 0).reshape(b, n, q)
    return g.permute(1, 2, 0).reshape(n, b, q).transpose(0, 1).contiguous()


def _forward_parts(x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """(a, g, y_ext): a = x blocks (b, N, p), g = P₁(R·x) (b, N, q), y_ext (N, m_ext)."""
    b, q, p = w1.shape
    s = w2.shape[1]
    n_rows, n_in = x2.shape
    if n_in < b * p:
        x2 = F.pad(x2, (0, b * p - n_in))
    a = x2.view(n_rows, b, p).transpose(0, 1)             # strided view, bmm reads it in place
    h = torch.bmm(a, w1.transpose(1, 2))                   # (b, N, q)
    g = _perm1(h)
    o = torch.bmm(g, w2.transpose(1, 2))                   # (b, N, s)
    y = o.permute(1, 2, 0).reshape(n_rows, s * b)          # P₂: o = s'·b + c
    return a, g, y


def _apply(x, w1, w2, bias, out_features, dense, threshold, fused: bool):
    m = int(out_features) if out_features is not None else w2.shape[0] * w2.shape[1]
    lead = x.shape[:-1]
    if dense is not None and _rows(x) <= threshold:
        return F.linear(x, dense, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if fused:
        return _fused(x2, w1, w2, bias, m).view(*lead, m)
    _, _, y = _forward_parts(x2, w1, w2)
    if y.shape[1] != m:
        y = y[:, :m]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, m)


def _fused(x2, w1, w2, bias, m):
    """The op's own path: h, g and o go to per-thread workspace buffers on the CPU (below) and P₂ writes o
    permuted straight into the contiguous output, the bias added in the same pass. Returns (rows, m)."""
    b, q, p = w1.shape
    s = w2.shape[1]
    rows = x2.shape[0]
    a = x2 if x2.shape[1] == b * p else F.pad(x2, (0, b * p - x2.shape[1]))
    a = a.view(rows, b, p).transpose(0, 1)                  # strided view, bmm reads it in place
    dt, dev = x2.dtype, x2.device
    h = torch.bmm(a, w1.transpose(1, 2), out=_scratch("h", (b, rows, q), dt, dev))
    if q % b == 0:
        g = _scratch("g", (b, rows, q), dt, dev)
        g.view(b, rows, b, q // b).copy_(h.view(b, rows, q // b, b).permute(3, 1, 0, 2))
    else:
        g = _perm1(h)
    o = torch.bmm(g, w2.transpose(1, 2), out=_scratch("o", (b, rows, s), dt, dev))
    y = torch.empty(rows, s, b, dtype=dt, device=dev)
    if bias is not None and s * b == m:
        torch.add(o.permute(1, 2, 0), bias.view(s, b), out=y)
        return y.view(rows, m)
    y.copy_(o.permute(1, 2, 0))
    out = y.view(rows, s * b)[:, :m]                       # truncated to m (a padded output)
    return out + bias if bias is not None else out.contiguous()


_WORKSPACE = threading.local()


def _scratch(name: str, shape: tuple, dtype, device) -> torch.Tensor:
    """A buffer for an intermediate that never leaves the op: reused across calls on the CPU, fresh elsewhere.
    On the CPU a fresh large tensor costs page faults on every call — glibc maps big blocks afresh and the kernel
    zeroes each 4 KiB page on first touch — so h, g and o (a Monarch layer's rows × b·q and rows × b·s intermediates)
    live in per-thread buffers, one per (name, shape, dtype), at most 24 of them. CUDA's caching allocator
    already reuses memory: a plain torch.empty there (and on any other device)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    key = (name, shape, dtype)
    buf = buffers.get(key)
    if buf is None:
        if len(buffers) >= 24:
            buffers.clear()
        buf = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def factored(x, w1, w2, bias=None, out_features=None):
    """The factored path alone (no pre-merged dense branch), in the op's own formulation (bias fused into the P₂
    copy): the aten candidate codegen.select times against the Triton kernels."""
    return _apply(x, w1, w2, bias, out_features, None, 0, fused=True)


def reference(x, w1, w2, bias=None, out_features=None, dense=None, threshold=0):
    """Plain aten ops (functional), as `--decompose` inlines them."""
    return _apply(x, w1, w2, bias, out_features, dense, threshold, fused=False)


@torch.library.custom_op("rewrite::monarch_linear", mutates_args=())
def monarch_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int, dense: torch.Tensor | None = None, threshold: int = 0) -> torch.Tensor:
    return _apply(x, w1, w2, bias, out_features, dense, threshold, fused=True).contiguous()


@monarch_linear.register_fake
def _(x, w1, w2, bias, out_features, dense=None, threshold=0):
    return x.new_empty(*x.shape[:-1], out_features)


def _setup_context(ctx, inputs, output):
    x, w1, w2, bias, out_features, dense, threshold = inputs
    ctx.save_for_backward(x, w1, w2)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, w1, w2 = ctx.saved_tensors
    b, q, p = w1.shape
    s = w2.shape[1]
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    n_rows = x2.shape[0]
    g2 = grad.reshape(n_rows, -1)
    a, g, _ = _forward_parts(x2, w1, w2)
    if g2.shape[1] < s * b:
        g2 = F.pad(g2, (0, s * b - g2.shape[1]))
    do = g2.view(n_rows, s, b).permute(2, 0, 1)            # (b, N, s), inverse of P₂
    grad_w2 = torch.bmm(do.transpose(1, 2), g) if ctx.needs_input_grad[2] else None
    grad_x = grad_w1 = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dh = _perm1_inv(torch.bmm(do, w2))                 # (b, N, q)
        if ctx.needs_input_grad[1]:
            grad_w1 = torch.bmm(dh.transpose(1, 2), a)
        if ctx.needs_input_grad[0]:
            da = torch.bmm(dh, w1)                          # (b, N, p)
            grad_x = da.transpose(0, 1).reshape(n_rows, b * p)[:, :n_in].reshape(x.shape)
    grad_bias = grad.reshape(n_rows, -1).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, grad_w1, grad_w2, grad_bias, None, None, None


monarch_linear.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.monarch_linear.default


def flops(node):
    """2·N·q·(b·p + b·s) for the two block-diagonal products, or 2·N·n·m on the pre-merged dense path."""
    x, w1, w2 = (node.args[i].meta["val"] for i in range(3))
    dense = node.args[5] if len(node.args) > 5 else node.kwargs.get("dense")
    threshold = node.args[6] if len(node.args) > 6 else node.kwargs.get("threshold", 0)
    rows = x.numel() // x.shape[-1]
    if dense is not None and rows <= threshold:
        d = dense.meta["val"]
        return 2 * rows * d.shape[0] * d.shape[1]
    b, q, p = w1.shape
    return 2 * rows * q * (b * p + b * w2.shape[1])
