"""`rewrite::softplus_attention` — length-scaled softplus attention, LSSA / LSSAR (Gao & Spratling,
arXiv 2501.13428).

    q̂ = q / ‖q‖,  k̂ = k / ‖k‖                               (rows L2-normalised)
    Nᵢ = number of keys row i may attend to                  (causal: i + 1; bidirectional, no mask: Tk)
    A  = softplus(gₕ · log d · log Nᵢ · q̂ k̂ᵀ + bₕ) ⊙ M       (M the 0/1 "may attend" mask)
    A  = A / (Σⱼ Aᵢⱼ + eps)                                   (rows L1-normalised)
    re-weighting (LSSAR, reweight=True):
    R  = ReLU(A · Nᵢ − Oᵢ),   Oᵢ = 1, except Oᵢ = 0 where Nᵢ = 1 (a row with one visible key)
    R  = (R / (maxⱼ Rᵢⱼ + eps))^p                             (row-max division first: no fp32 overflow for p = 15)
    A  = R / (Σⱼ Rᵢⱼ + eps)       only on rows with Nᵢ > train_len (train_len = 0: every row) and Σ R > 0
    out = A @ v

A uniform row (all weights 1/Nᵢ, e.g. the first causal row) has R = 0 everywhere; it keeps its LSSA weights.
The model's own score scale is not used: LSSA normalises q and k and sets its own scale log d · log Nᵢ.
gain g and bias b (optional, float tensors of H or 1 elements, H = q.shape[-3]; absent: g = 1, b = 0, the paper's
LSSA) are a per-head gain on that scale and an offset under the softplus, fitted by the pass on calibration data
(passes/softplus_attn.py) and trained by heal: with b ≪ 0 softplus(x + b) ≈ eᵇ·eˣ and the row becomes a softmax of
g · log d · log Nᵢ · q̂k̂ᵀ; with b ≫ 0 it is linear in the scores — one family from softmax-like to linear.
Low-precision inputs are computed in fp32 and the output cast back. Autograd recomputes the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.library.custom_op("rewrite::softplus_attention", mutates_args=())
def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool, reweight: bool, p: float, train_len: int, eps: float,
                       gain: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    return reference(q, k, v, mask, is_causal, reweight, p, train_len, eps, gain, bias)


def per_head(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """A gain / bias of H (or 1) elements shaped to broadcast over (…, H, Tq, Tk)."""
    return None if t is None else t.to(acc).reshape(-1, 1, 1)


def logits(q, k, mask=None, is_causal=False, eps=1e-6, gain=None, bias=None):
    """(z, keep, N): the arguments of the softplus, z = gₕ · log d · log Nᵢ · q̂k̂ᵀ + bₕ, the bool "may attend"
    mask expanded to z's shape, and Nᵢ (…, Tq, 1) — in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(acc), k.to(acc)
    d, tq, tk = q.shape[-1], q.shape[-2], k.shape[-2]
    s = F.normalize(q, dim=-1, eps=eps) @ F.normalize(k, dim=-1, eps=eps).transpose(-2, -1)
    keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if is_causal:
        keep = keep.tril()
    if mask is not None:
        keep = keep & mask.to(torch.bool)
    keep = keep.expand(s.shape)
    n = keep.sum(-1, keepdim=True).to(acc)
    z = math.log(d) * torch.log(n.clamp_min(1.0)) * s
    if gain is not None:
        z = z * per_head(gain, acc)
    if bias is not None:
        z = z + per_head(bias, acc)
    return z, keep, n


def attention_weights(q, k, mask=None, is_causal=False, reweight=False, p=15.0, train_len=0, eps=1e-6, gain=None,
                      bias=None):
    """The (…, Tq, Tk) LSSA / LSSAR weights, in fp32 (fp64 for fp64 inputs)."""
    z, keep, n = logits(q, k, mask, is_causal, eps, gain, bias)
    acc = z.dtype
    a = F.softplus(z) * keep
    a = a / (a.sum(-1, keepdim=True) + eps)
    if reweight:
        offset = (n > 1).to(acc)
        r = torch.relu(a * n - offset)
        r = r / (r.amax(-1, keepdim=True) + eps)
        r = r.pow(p)
        total = r.sum(-1, keepdim=True)
        r = r / (total + eps)
        use = total > 0
        if train_len > 0:
            use = use & (n > train_len)
        a = torch.where(use, r, a)
    return a


def reference(q, k, v, mask=None, is_causal=False, reweight=False, p=15.0, train_len=0, eps=1e-6, gain=None,
              bias=None):
    a = attention_weights(q, k, mask, is_causal, reweight, p, train_len, eps, gain, bias)
    return (a @ v.to(a.dtype)).to(q.dtype)


@softplus_attention.register_fake
def _(q, k, v, mask, is_causal, reweight, p, train_len, eps, gain=None, bias=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, reweight, p, train_len, eps, *head = inputs
    head = (head + [None, None])[:2]
    ctx.save_for_backward(q, k, v, mask, *head)
    ctx.options = (is_causal, reweight, p, train_len, eps)
    ctx.present = (mask is not None, head[0] is not None, head[1] is not None)


def _backward(ctx, grad):
    q, k, v, mask, gain, bias = ctx.saved_tensors
    has_mask, has_gain, has_bias = ctx.present
    needs = list(ctx.needs_input_grad[:3]) + list((ctx.needs_input_grad + (False, False))[9:11])
    learned = [t.detach().requires_grad_(need) if t is not None and present else None
               for t, need, present in zip((q, k, v, gain, bias), needs, (True, True, True, has_gain, has_bias))]
    with torch.enable_grad():
        out = reference(*learned[:3], mask if has_mask else None, *ctx.options, learned[3], learned[4])
        wanted = [t for t in learned if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True)) if wanted else iter(())
    q_g, k_g, v_g, gain_g, bias_g = [next(grads) if t is not None and t.requires_grad else None for t in learned]
    return q_g, k_g, v_g, None, None, None, None, None, None, gain_g, bias_g


softplus_attention.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.softplus_attention.default


def flops(node):
    """2·B·H·Tq·Tk·(d + dv) for the two products, plus ~10 per score for normalising, softplus and re-weighting."""
    q, k, v = (node.args[i].meta["val"] for i in range(3))      # gain and bias: a few flops per score
    rows = q.numel() // q.shape[-1]
    tk = k.shape[-2]
    return 2 * rows * tk * (q.shape[-1] + v.shape[-1]) + 10 * rows * tk
