"""`rewrite::lora_linear` — a linear layer with a low-rank adapter.

    y = x·Wᵀ + b + scale · (x_a·Aᵀ)·Bᵀ        W: (out, in), A: (r, in), B: (out, r)

`x_a` is the adapter's input: `x` itself, or `dropout(x)` when the adapter was inserted with dropout (the pass
puts that node in the graph, so the op stays deterministic and its backward needs no saved mask).

Eager cost (the op's own implementation, `forward`): one GEMM for x·Wᵀ + b, then the adapter is accumulated into that
output in place — h = x_a·Aᵀ (N × r), y += s·h·Bᵀ with one `addmm_` — so the only temporary is h, r values per row,
and no full-size tensor is made besides y (the un-fused formula makes three: the two products and their sum).
`reference` is the same formula with functional ops only (what `--decompose` inlines).
Autograd gives gradients for every tensor input; the base weight normally has requires_grad=False so only
A and B train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("rewrite::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, adapter_input: torch.Tensor | None = None) -> torch.Tensor:
    return forward(x, weight, bias, lora_a, lora_b, scale, adapter_input)


def forward(x, weight, bias, lora_a, lora_b, scale, adapter_input=None):
    """x·Wᵀ + b, then += s·(x_a·Aᵀ)·Bᵀ accumulated in place (see the module docstring)."""
    y = F.linear(x, weight, bias)
    h = F.linear(x if adapter_input is None else adapter_input, lora_a)
    y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
    y2.addmm_(h if h.dim() == 2 else h.reshape(-1, h.shape[-1]), lora_b.t(), alpha=scale)
    return y


def reference(x, weight, bias, lora_a, lora_b, scale, adapter_input=None):
    xa = x if adapter_input is None else adapter_input
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(xa, lora_a), lora_b)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, adapter_input=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, adapter_input = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, adapter_input)
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.has_adapter_input = adapter_input is not None


def _backward(ctx, grad):
    x, weight, lora_a, lora_b, adapter_input = ctx.saved_tensors
    s = ctx.scale
    xa = adapter_input if ctx.has_adapter_input else x
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = xa.reshape(-1, xa.shape[-1])
    g_b = g2 @ lora_b                      # (N, r)
    h = xa2 @ lora_a.t()                   # (N, r)
    grad_x = (g2 @ weight).reshape(x.shape)
    grad_xa = (s * g_b @ lora_a).reshape(xa.shape)
    if ctx.has_adapter_input:
        grad_adapter = grad_xa
    else:
        grad_x = grad_x + grad_xa
        grad_adapter = None
    grad_w = g2.t() @ x2 if ctx.needs_input_grad[1] else None
    grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    grad_a = s * g_b.t() @ xa2 if ctx.needs_input_grad[3] else None
    grad_bb = s * g2.t() @ h if ctx.needs_input_grad[4] else None
    return grad_x, grad_w, grad_bias, grad_a, grad_bb, None, grad_adapter


lora_linear.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.lora_linear.default


def flops(node):
    """2·N·(in·out + r·(in + out)): the base matmul plus the two adapter matmuls, N = rows of x."""
    x, weight, lora_a = node.args[0].meta["val"], node.args[1].meta["val"], node.args[3].meta["val"]
    rows = x.numel() // x.shape[-1]
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    return 2 * rows * (in_f * out_f + r * (in_f + out_f))
