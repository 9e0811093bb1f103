"""Monarch linear in one kernel: y = act(P₂·L·P₁·R·x + b) + residual with both permutations folded into the
addressing.

Layout (rewriter/ops/monarch_linear.py): w1 (b, q, p) = R, w2 (b, s, q) = L, x zero-padded to b·p,
h[k, j] = Σ_r w1[k, j, r]·x[k·p + r];  P₁: g[c, i] = h_flat[i·b + c] (h_flat[k·q + j] = h[k, j]);
y_ext[s'·b + c] = Σ_i w2[c, s', i]·g[c, i];  y = y_ext[:m] + bias.

One program owns a (BM rows) × (output block c, BS of its s outputs) tile. The entries of g[c, ·] that come from
input block k are i ∈ [⌈(k·q − c)/b⌉, ⌈((k+1)·q − c)/b⌉) — at most T = ⌈q/b⌉ of them — at h[k, j] with
j = i·b + c − k·q. So for k = 0..b−1:

    g_k (BM, BT)  = x[:, k·p : k·p+p] · w1[k, j(t), :]ᵀ        (w1 rows gathered by address: P₁)
    acc (BM, BS) += g_k · w2[c, s', i(t)]ᵀ                     (w2 columns gathered by address)

and the tile is stored at columns s'·b + c (P₂ as a strided store), truncated to m, after the epilogue: + bias,
activation (ACT: 0 none, 1 GELU-erf, 2 GELU-tanh), + residual (HAS_RES; read at those same columns with its own
strides) — the pointwise ops that follow an FFN's up/down projection, folded as in the LoRA template. Every product of
x with R and of g with L is computed exactly once per s-block (no wasted FLOPs when s ≤ BS); no permuted copy of
anything is made, and the zero padding of x is a load mask. g_k is built BT ≤ 64 entries at a time (BT ≥ 16:
tl.dot needs K ≥ 16 on GPU, so when q/b < 16 the second product pads with masked zeros). With s > BS, g is
recomputed per s-block (cheap when b ≈ √n, the paper's shape, where p = q = s are small).

Precision (UPCAST = codegen.runtime.mma_upcast(dtype)): fp32 inputs are dotted as fp32 (IEEE), bf16 under the
interpreter is upcast to fp32. fp16 (and bf16 on a GPU) goes to tl.dot as loaded — tensor-core MMA, fp32
accumulation — and the one rounded intermediate is g_k: accumulated in fp32 over p, then cast to the input dtype
before ·w2 (the reference's bmm in fp16 returns h, hence g, in fp16 too: same rounding, ≤ |g|·2⁻¹¹ per entry).
acc, the bias add, the activation, the residual add and the P₂ store stay fp32 until the final cast to the output
dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen import tl_math
from codegen.runtime import interpreter, mma_upcast
from codegen.epilogue import ACTIVATIONS, epilogue


@triton.jit
def monarch_linear_kernel(x_ptr, w1_ptr, w2_ptr, b_ptr, res_ptr, y_ptr,
                          M, N_IN, M_OUT, NB, P, Q, S, T,
                          sxm, sxk, s1b, s1q, s1p, s2b, s2s, s2q, srm, srn, sym, syn,
                          HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr,
                          BM: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_1 = tl.program_id(1)
    s_blocks = tl.cdiv(S, BS)
    c = pid_1 // s_blocks
    rm = pid_m * BM + tl.arange(0, BM)
    rs = (pid_1 % s_blocks) * BS + tl.arange(0, BS)
    tt = tl.arange(0, BT)
    m_ok = rm < M
    s_ok = rs < S
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    for k in range(0, NB):
        i_lo = (k * Q - c + NB - 1) // NB               # the entries of g[c, ·] fed by input block k
        for t0 in range(0, T, BT):
            i = i_lo + t0 + tt
            f = i * NB + c
            t_ok = (f < (k + 1) * Q) & (t0 + tt < T)
            j = f - k * Q
            g = tl.zeros((BM, BT), dtype=tl.float32)
            for p0 in range(0, P, BP):
                rp = p0 + tl.arange(0, BP)
                col = k * P + rp
                p_ok = (rp < P) & (col < N_IN)           # x's zero padding to b·p is this mask
                xa = tl.load(x_ptr + rm[:, None] * sxm + col[None, :] * sxk, mask=m_ok[:, None] & p_ok[None, :],
                             other=0.0)
                w1 = tl.load(w1_ptr + k * s1b + j[None, :] * s1q + rp[:, None] * s1p,
                             mask=t_ok[None, :] & (rp < P)[:, None], other=0.0)
                if UPCAST:
                    xa = xa.to(tl.float32)
                    w1 = w1.to(tl.float32)
                if IEEE:
                    g = tl.dot(xa, w1, g, input_precision="ieee", out_dtype=tl.float32)
                else:
                    g = tl.dot(xa, w1, g, out_dtype=tl.float32)
            w2 = tl.load(w2_ptr + c * s2b + rs[None, :] * s2s + i[:, None] * s2q,
                         mask=t_ok[:, None] & s_ok[None, :], other=0.0)
            if UPCAST:
                w2 = w2.to(tl.float32)
            else:
                g = g.to(w2_ptr.dtype.element_ty)        # g rounded to the input dtype (one dtype per tl.dot)
            if IEEE:
                acc = tl.dot(g, w2, acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(g, w2, acc, out_dtype=tl.float32)
    o = rs * NB + c                                        # P₂: output column s'·b + c
    o_ok = s_ok & (o < M_OUT)
    out_mask = m_ok[:, None] & o_ok[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl_math.gelu_erf(acc)
    if ACT == 2:
        acc = tl_math.gelu_tanh(acc)
    if HAS_RES:
        acc = acc + tl.load(res_ptr + rm[:, None] * srm + o[None, :] * srn, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * sym + o[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(v, hi) if hi is not None else v


def pick_blocks(M: int, P: int, T: int, S: int) -> dict:
    """Small tiles under the interpreter (its cost ∝ programs × loop trips); GPU tiles otherwise. All ≥ 16."""
    if interpreter():
        return dict(BM=_pow2(M, hi=64), BP=_pow2(P, hi=64), BT=_pow2(T, hi=64), BS=_pow2(S, hi=64))
    return dict(BM=_pow2(M, hi=64), BP=_pow2(P, hi=64), BT=_pow2(T, hi=64), BS=_pow2(S, hi=128))


def supported(x, w1, w2, bias, residual=None) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} has no kernel"
    for t in (w1, w2, bias, residual):
        if t is not None and t.dtype != x.dtype:
            return "mixed dtypes"
    return None


def launch(x, w1, w2, bias, out_features: int, activation: str = "none", residual: torch.Tensor | None = None,
           blocks: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The factored path of rewrite::monarch_linear, then the epilogue act(·) + residual (residual: broadcastable
    to the output). `out` (rows, out_features), any strides, gets the result."""
    nb, q, p = w1.shape
    s = w2.shape[1]
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    rows = x2.shape[0]
    m = int(out_features)
    y = torch.empty(rows, m, dtype=x.dtype, device=x.device) if out is None else out
    res2 = residual.broadcast_to(*x.shape[:-1], m).reshape(rows, m) if residual is not None else y
    T = -(-q // nb)
    b = blocks or pick_blocks(rows, p, T, s)
    if rows and m:
        grid = (triton.cdiv(rows, b["BM"]), nb * triton.cdiv(s, b["BS"]))
        monarch_linear_kernel[grid](
            x2, w1, w2, bias if bias is not None else y, res2, y, rows, n_in, m, nb, p, q, s, T,
            x2.stride(0), x2.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
            w2.stride(0), w2.stride(1), w2.stride(2), res2.stride(0), res2.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], HAS_RES=residual is not None,
            UPCAST=mma_upcast(x.dtype), IEEE=x.dtype == torch.float32, **b)
    return y.reshape(*x.shape[:-1], m) if out is None else out


def reference(x, w1, w2, bias, out_features, dense=None, threshold=0, activation="none", residual=None):
    """rewrite::monarch_linear's reference (its pre-merged dense path included), then the epilogue."""
    from rewriter.ops import monarch_linear as op
    return epilogue(op.reference(x, w1, w2, bias, out_features, dense, threshold), activation, residual)
