"""`rewrite::shiftadd_linear` — a linear layer with binary-coded, power-of-two-scaled weights (ShiftAddLLM).

    W[r, j·g + c] = s[r, j] · Σᵢ Σₜ 2^{e[r, j, i, t]} · (2·bit(signs[i, r, (j·g + c)/8], c mod 8) − 1) + β[r, j]
    y = x·Wᵀ + b

signs: uint8 (q, out, in_pad/8), exponents: int8 (out, in_pad/g, q, terms) with -128 meaning 0, or broadcastable
to that shape; scales s and offsets β: None (s = 1, β = 0: the pow2 code) or (out, in_pad/g) float (the affine
code: exponents (1, 1, q, 1)) — see rewriter/bcq.py.
Two equal paths (tested to agree within fp32 rounding): `lut_reference` is the LUT matmul (per 8 activations a
256-entry table of signed partial sums, indexed by the sign bytes, scaled by ldexp) — the algorithm the Triton
kernel implements; `reference` dequantises, then calls the BLAS matmul. The op runs `reference` on the CPU:
in plain PyTorch the gathers of the LUT path are 27–80× slower than a dense matmul (bench/shiftadd.py), so the
LUT only pays off as a fused kernel. Autograd: gradient for x
only (the packed weights are not trainable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import bcq


@torch.library.custom_op("rewrite::shiftadd_linear", mutates_args=())
def shiftadd_linear(x: torch.Tensor, signs: torch.Tensor, exponents: torch.Tensor, bias: torch.Tensor | None,
                    in_features: int, group: int, scales: torch.Tensor | None = None,
                    offsets: torch.Tensor | None = None) -> torch.Tensor:
    return reference(x, signs, exponents, bias, in_features, group, scales, offsets)


def lut_reference(x, signs, exponents, bias, in_features, group, scales=None, offsets=None):
    return bcq.lut_matmul(x, signs, exponents, in_features, group, bias, scales=scales, offsets=offsets)


def reference(x, signs, exponents, bias, in_features, group, scales=None, offsets=None):
    w = bcq.dequantize(signs, exponents, in_features, group, scales, offsets).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@shiftadd_linear.register_fake
def _(x, signs, exponents, bias, in_features, group, scales=None, offsets=None):
    return x.new_empty(*x.shape[:-1], signs.shape[1])


def _setup_context(ctx, inputs, output):
    x, signs, exponents, bias, in_features, group, scales, offsets = inputs
    ctx.save_for_backward(signs, exponents, scales, offsets)
    ctx.in_features, ctx.group = in_features, group
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    signs, exponents, scales, offsets = ctx.saved_tensors
    w = bcq.dequantize(signs, exponents, ctx.in_features, ctx.group, scales, offsets).to(grad.dtype)
    grad_x = grad @ w if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b, None, None, None, None


shiftadd_linear.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.shiftadd_linear.default


def flops(node):
    """Additions of the LUT path: N·(in_pad/8)·256 to build the tables, q·N·out·in_pad/8 table reads summed,
    and q·terms·N·out·groups shifted adds of the group sums (no multiplications), N = rows of x; the affine code
    adds a multiply-add per (row, output, group) for each of its scales and offsets."""
    x, signs, exps = (node.args[i].meta["val"] for i in range(3))
    rows = x.numel() // x.shape[-1]
    q, out_f, nbytes = signs.shape
    group = node.args[5]
    groups, terms = nbytes * 8 // group, exps.shape[3]
    affine = sum(2 for i, name in ((6, "scales"), (7, "offsets"))
                 if (node.args[i] if len(node.args) > i else node.kwargs.get(name)) is not None)
    return rows * nbytes * 256 + q * rows * out_f * nbytes + (q * terms + affine) * rows * out_f * groups
