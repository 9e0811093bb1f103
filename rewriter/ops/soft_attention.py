"""`rewrite::soft_attention` — softmax-free attention with a Gaussian kernel and a Nyström low-rank form
(SOFT, Lu et al. 2021, fudan-zvg/SOFT).

    κ(a, b) = exp(−‖a − b‖² / (2√d))                  shared queries and keys: K = Q (the paper's choice)
    Q̃ = average-pool(Q) to m landmarks along the sequence
    out = κ(Q, Q̃) · pinv(κ(Q̃, Q̃)) · κ(Q̃, Q) · V         evaluated right to left: O(T·m·(d + dv) + m³)

pinv by Newton–Schulz (`newton_schulz`): P = A + ridge·I, V₀ = α·Pᵀ, V ← 2V − V·P·V (`iters` times; quadratic
convergence). SOFT starts from α = 2/(max row sum of P)² and halves α until ‖I − P·V₀‖₁ ≤ 1; that α lies on the
convergence boundary when P's rows sum to its top eigenvalue (every 2×2 kernel: the property test found it
stalling at a wrong fixed point), so we start from α = 1/(‖P‖₁‖P‖∞) ≤ 1/σ_max², which always converges (to the
Moore–Penrose inverse for singular P) and costs at most one more iteration.
Its gradient is the exact-inverse formula
∂L/∂P = −Vᵀ·(∂L/∂V)·Vᵀ (`NewtonSchulzInverse`, a custom autograd Function), not the unrolled iterations.
‖a − b‖² is computed from differences (torch.cdist without the matmul expansion), avoiding cancellation.
Low-precision inputs are computed in fp32. The op's autograd recomputes the reference (through the Function).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def newton_schulz(p: torch.Tensor, iters: int = 20, ridge: float = 0.0) -> torch.Tensor:
    """Approximate (pseudo-)inverse of the last two dims of `p` by Newton–Schulz iteration (no grad)."""
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    p = p + ridge * eye
    pt = p.transpose(-2, -1)
    tiny = torch.finfo(p.dtype).tiny
    # α = 1/(‖P‖₁‖P‖∞) ≤ 1/σ_max²: every eigenvalue of I − αPPᵀ lies in [0, 1), so the iteration converges
    # (to the pseudo-inverse when P is singular). SOFT's α = 2/‖P‖∞² sits exactly on the boundary when P's
    # rows sum to its top eigenvalue (any 2×2 kernel), where the iteration stalls at a wrong fixed point.
    alpha = 1.0 / (p.abs().sum(-1).amax(-1) * p.abs().sum(-2).amax(-1)).clamp_min(tiny)[..., None, None]
    v = alpha * pt
    for _ in range(iters):
        v = 2 * v - v @ p @ v
    return v


class NewtonSchulzInverse(torch.autograd.Function):
    """V = NS(A + ridge·I) forward; backward as if V were the exact inverse: dA = −Vᵀ·dV·Vᵀ."""

    @staticmethod
    def forward(ctx, a, iters: int, ridge: float):
        v = newton_schulz(a, iters, ridge)
        ctx.save_for_backward(v)
        return v

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        vt = v.transpose(-2, -1)
        return -vt @ grad @ vt, None, None


def ns_inverse(a: torch.Tensor, iters: int = 20, ridge: float = 0.0) -> torch.Tensor:
    return NewtonSchulzInverse.apply(a, iters, ridge)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(−‖aᵢ − bⱼ‖² / (2√d)) for a (…, Ta, d), b (…, Tb, d)."""
    d = a.shape[-1]
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    dist2 = torch.cdist(a3, b3, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    return torch.exp(-dist2 / (2.0 * math.sqrt(d))).reshape(*lead, a.shape[-2], b.shape[-2])


def landmarks_of(x: torch.Tensor, m: int) -> torch.Tensor:
    """m landmarks by average pooling along the sequence (…, T, d) → (…, m, d) (adaptive bins when m ∤ T)."""
    t, d = x.shape[-2], x.shape[-1]
    x3 = x.reshape(-1, t, d).transpose(1, 2)
    pooled = F.adaptive_avg_pool1d(x3, m).transpose(1, 2)
    return pooled.reshape(*x.shape[:-2], m, d)


@torch.library.custom_op("rewrite::soft_attention", mutates_args=())
def soft_attention(qk: torch.Tensor, v: torch.Tensor, landmarks: int, iters: int, ridge: float) -> torch.Tensor:
    return reference(qk, v, landmarks, iters, ridge)


def reference(qk, v, landmarks=32, iters=20, ridge=0.0):
    acc = torch.float64 if qk.dtype == torch.float64 else torch.float32
    x, vv = qk.to(acc), v.to(acc)
    m = min(int(landmarks), x.shape[-2])
    lm = landmarks_of(x, m)
    k_xl = gaussian_kernel(x, lm)                       # (…, T, m)
    k_ll = gaussian_kernel(lm, lm)                      # (…, m, m)
    inv = ns_inverse(k_ll, iters, ridge)
    out = k_xl @ (inv @ (k_xl.transpose(-2, -1) @ vv))  # κ(Q̃, Q) = κ(Q, Q̃)ᵀ
    return out.to(qk.dtype)


def dense_reference(qk, v, landmarks=32, iters=20, ridge=0.0):
    """The full Gaussian-kernel attention κ(Q, Q)·V that the Nyström form approximates (tests, reports)."""
    acc = torch.float64 if qk.dtype == torch.float64 else torch.float32
    return (gaussian_kernel(qk.to(acc), qk.to(acc)) @ v.to(acc)).to(qk.dtype)


@soft_attention.register_fake
def _(qk, v, landmarks, iters, ridge):
    return qk.new_empty(*qk.shape[:-1], v.shape[-1])


def _setup_context(ctx, inputs, output):
    qk, v, landmarks, iters, ridge = inputs
    ctx.save_for_backward(qk, v)
    ctx.options = (landmarks, iters, ridge)


def _backward(ctx, grad):
    qk, v = ctx.saved_tensors
    inputs = [t.detach().requires_grad_(need) for t, need in zip((qk, v), ctx.needs_input_grad[:2])]
    with torch.enable_grad():
        out = reference(*inputs, *ctx.options)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True)) if wanted else iter(())
    result = [next(grads) if t.requires_grad else None for t in inputs]
    return (*result, None, None, None)


soft_attention.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.soft_attention.default


def cost_terms(t, m, d, dv, iters):
    """(FLOPs, attention-matrix elements) per head for sequence length t — ints or sympy expressions.

    κ(Q, Q̃): 3·T·m·d;  κ(Q̃, Q̃): 3·m²·d;  Newton–Schulz: 10 halving checks + iters × 2 matmuls of m³;
    κᵀV, pinv·(…), κ·(…): 2·T·m·dv + 2·m²·dv + 2·T·m·dv.  Memory: T·m + m² instead of T².
    """
    flops = 3 * t * m * d + 3 * m * m * d + (2 * iters + 10) * 2 * m ** 3 + 4 * t * m * dv + 2 * m * m * dv
    return flops, t * m + m * m


def flops(node):
    qk, v = node.args[0].meta["val"], node.args[1].meta["val"]
    t, d, dv = qk.shape[-2], qk.shape[-1], v.shape[-1]
    heads = qk.numel() // (t * d)
    m = min(int(node.args[2]), t)
    return heads * cost_terms(t, m, d, dv, int(node.args[3]))[0]
