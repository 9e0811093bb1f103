"""Block-diagonal linear (+ optional dense U) and low-rank linear, one kernel each call.

rewrite::blockdiag_linear (rewriter/ops/blockdiag_linear.py): blocks (b, t, p), x zero-padded to b·p,
    h[k·t + j] = Σ_p blocks[k, j, p]·x[k·p + p]
    plain       y = h[:m] + bias                 grid (row blocks, b·t-blocks): a program stores its h_k tile
    BlockDense  y = h·Uᵀ + bias   (U: (m, b·t))  grid (row blocks, m-blocks): for k = 0..b−1 the (BM, BT) tile
                h_k = x_k·blocks[k]ᵀ stays in registers and acc += h_k·U[:, k·t : k·t+t]ᵀ
rewrite::lowrank_linear: y = (x·Vᵀ)·Uᵀ + b is BlockDense with one block (blocks = V viewed as (1, r, n)), so the
rank-r intermediate stays in registers as in the LoRA template (r ≤ 128 per tile of BT ≥ r).

The zero padding of x is a load mask; every block ≥ 16 (tl.dot K ≥ 16).

Epilogue (as in the LoRA template), on the fp32 tile right before its store: + bias, activation (ACT: 0 none,
1 GELU-erf, 2 GELU-tanh), + residual (HAS_RES: read at the stored columns with its own strides). A structured
FFN's up-projection is followed by GELU, its down-projection by the residual add: both fold in here.

Precision (UPCAST = codegen.runtime.mma_upcast(dtype)): fp32 inputs are dotted as fp32 (IEEE), bf16 under the
interpreter is upcast to fp32. fp16 (and bf16 on a GPU) goes to tl.dot as loaded — tensor-core MMA, fp32
accumulation. BlockDense / low-rank: h_k is accumulated in fp32 over p and cast to the input dtype before ·Uᵀ
(the reference's bmm / F.linear in fp16 returns h in fp16 too: same rounding, ≤ |h|·2⁻¹¹ per entry). Plain
block-diagonal: h_k + bias (then the epilogue) is formed in fp32 and rounded once, at the store (the reference
rounds h, then h + b). Bias adds, activation, residual adds and accumulators are fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen import tl_math
from codegen.runtime import interpreter, mma_upcast
from codegen.epilogue import ACTIVATIONS, epilogue


@triton.jit
def blockdiag_linear_kernel(x_ptr, v_ptr, u_ptr, b_ptr, res_ptr, y_ptr,
                            M, N_IN, M_OUT, NB, P, T,
                            sxm, sxk, svb, svt, svp, sun, suk, srm, srn, sym, syn,
                            HAS_U: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                            UPCAST: tl.constexpr, IEEE: tl.constexpr,
                            BM: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_1 = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    m_ok = rm < M
    if HAS_U:
        rn = pid_1 * BN + tl.arange(0, BN)
        n_ok = rn < M_OUT
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = 0
        k_hi = NB
        t_lo = 0
        t_hi = T
    else:
        t_blocks = tl.cdiv(T, BT)
        k_lo = pid_1 // t_blocks
        k_hi = k_lo + 1
        t_lo = (pid_1 % t_blocks) * BT
        t_hi = t_lo + 1                     # one BT-wide tile of block k
    for k in range(k_lo, k_hi):
        for t0 in range(t_lo, t_hi, BT):
            rt = t0 + tl.arange(0, BT)
            t_ok = rt < T
            h = tl.zeros((BM, BT), dtype=tl.float32)
            for p0 in range(0, P, BP):
                rp = p0 + tl.arange(0, BP)
                col = k * P + rp
                p_ok = (rp < P) & (col < N_IN)
                xa = tl.load(x_ptr + rm[:, None] * sxm + col[None, :] * sxk, mask=m_ok[:, None] & p_ok[None, :],
                             other=0.0)
                v = tl.load(v_ptr + k * svb + rt[None, :] * svt + rp[:, None] * svp,
                            mask=t_ok[None, :] & (rp < P)[:, None], other=0.0)
                if UPCAST:
                    xa = xa.to(tl.float32)
                    v = v.to(tl.float32)
                if IEEE:
                    h = tl.dot(xa, v, h, input_precision="ieee", out_dtype=tl.float32)
                else:
                    h = tl.dot(xa, v, h, out_dtype=tl.float32)
            if HAS_U:
                u = tl.load(u_ptr + rn[None, :] * sun + (k * T + rt)[:, None] * suk,
                            mask=t_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    u = u.to(tl.float32)
                    hd = h
                else:
                    hd = h.to(u_ptr.dtype.element_ty)    # h rounded to the input dtype (one dtype per tl.dot)
                if IEEE:
                    acc = tl.dot(hd, u, acc, input_precision="ieee", out_dtype=tl.float32)
                else:
                    acc = tl.dot(hd, u, acc, out_dtype=tl.float32)
            else:
                o = k * T + rt
                o_ok = t_ok & (o < M_OUT)
                o_mask = m_ok[:, None] & o_ok[None, :]
                if HAS_BIAS:
                    h = h + tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
                if ACT == 1:
                    h = tl_math.gelu_erf(h)
                if ACT == 2:
                    h = tl_math.gelu_tanh(h)
                if HAS_RES:
                    h = h + tl.load(res_ptr + rm[:, None] * srm + o[None, :] * srn, mask=o_mask,
                                    other=0.0).to(tl.float32)
                tl.store(y_ptr + rm[:, None] * sym + o[None, :] * syn, h.to(y_ptr.dtype.element_ty), mask=o_mask)
    if HAS_U:
        out_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            acc = tl_math.gelu_erf(acc)
        if ACT == 2:
            acc = tl_math.gelu_tanh(acc)
        if HAS_RES:
            acc = acc + tl.load(res_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=out_mask,
                                other=0.0).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(v, hi) if hi is not None else v


def pick_blocks(M: int, P: int, T: int, N: int) -> dict:
    hi_n = 64 if interpreter() else 128
    return dict(BM=_pow2(M, hi=64), BP=_pow2(P, hi=64), BT=_pow2(T, hi=128), BN=_pow2(N, hi=hi_n))


def supported(x, *tensors) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} has no kernel"
    if any(t is not None and t.dtype != x.dtype for t in tensors):
        return "mixed dtypes"
    return None


def launch(x, blocks, dense_u, bias, out_features: int, activation: str = "none",
           residual: torch.Tensor | None = None, tiles: dict | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The factored path of rewrite::blockdiag_linear, then the epilogue act(·) + residual (residual: broadcastable
    to the output); `out` (rows, out_features), any strides, gets the result."""
    nb, t, p = blocks.shape
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    rows = x2.shape[0]
    m = dense_u.shape[0] if dense_u is not None else int(out_features)
    y = torch.empty(rows, m, dtype=x.dtype, device=x.device) if out is None else out
    res2 = residual.broadcast_to(*x.shape[:-1], m).reshape(rows, m) if residual is not None else y
    b = tiles or pick_blocks(rows, p, t, m)
    if rows and m:
        n_tiles = triton.cdiv(m, b["BN"]) if dense_u is not None else nb * triton.cdiv(t, b["BT"])
        u = dense_u if dense_u is not None else y
        blockdiag_linear_kernel[(triton.cdiv(rows, b["BM"]), n_tiles)](
            x2, blocks, u, bias if bias is not None else y, res2, y, rows, n_in, m, nb, p, t,
            x2.stride(0), x2.stride(1), blocks.stride(0), blocks.stride(1), blocks.stride(2),
            u.stride(0), u.stride(1), res2.stride(0), res2.stride(1), y.stride(0), y.stride(1),
            HAS_U=dense_u is not None, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
            HAS_RES=residual is not None, UPCAST=mma_upcast(x.dtype), IEEE=x.dtype == torch.float32, **b)
    return y.reshape(*x.shape[:-1], m) if out is None else out


def launch_lowrank(x, u, v, bias, activation: str = "none", residual: torch.Tensor | None = None,
                   tiles: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The factored path of rewrite::lowrank_linear (one block of V, no copy: a view with a leading unit dim), then
    the epilogue."""
    return launch(x, v.unsqueeze(0), u, bias, u.shape[0], activation, residual, tiles=tiles, out=out)


def reference(x, blocks, dense_u, bias, out_features, dense=None, threshold=0, activation="none", residual=None):
    """rewrite::blockdiag_linear's reference (its pre-merged dense path included), then the epilogue."""
    from rewriter.ops import blockdiag_linear as op
    return epilogue(op.reference(x, blocks, dense_u, bias, out_features, dense, threshold), activation, residual)


def reference_lowrank(x, u, v, bias, dense=None, threshold=0, activation="none", residual=None):
    """rewrite::lowrank_linear's reference (its pre-merged dense path included), then the epilogue."""
    from rewriter.ops import lowrank_linear as op
    return epilogue(op.reference(x, u, v, bias, dense, threshold), activation, residual)
