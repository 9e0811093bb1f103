"""Fused LoRA linear: y = act(x·Wᵀ + b + s·(x_a·Aᵀ)·Bᵀ) + residual, in one kernel.

One program computes a (BM, BN) tile of y. Over the K loop it accumulates x·Wᵀ into `acc` (BM, BN) and the
adapter's down projection x_a·Aᵀ into `h` (BM, BR) in registers (BR = rank padded to ≥ 16, a power of two);
after the loop acc += s·h·Bᵀ. The rank-r intermediate never reaches global memory; each program recomputes
its rows' h (r ≪ N, so that is 2·BM·K·r extra flops per tile, ≈ r/BN of the base work).

Parameters (constexpr): block sizes BM/BN/BK, HAS_BIAS, HAS_XA (separate adapter input, e.g. dropout(x)),
ACT (0 none, 1 GELU-erf, 2 GELU-tanh) and HAS_RES (residual add) — the fused epilogue — UPCAST (dot operands →
fp32: codegen.runtime.mma_upcast, i.e. fp32 inputs and bf16 under the interpreter, whose bf16 is broken) and IEEE
(exact fp32 tl.dot for fp32 inputs; the GPU default is TF32).

Low precision (fp16; bf16 on a GPU): x, W, A, B go to tl.dot as loaded (tensor-core MMA, fp32 accumulation), so
the one rounded intermediate is s·h, cast to the input dtype before ·Bᵀ (the torch reference in fp16 rounds h =
x_a·Aᵀ and h·Bᵀ to fp16 too); bias, activation and residual are applied to the fp32 accumulator.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen import tl_math
from codegen import runtime
from codegen.epilogue import ACTIVATIONS, epilogue
from codegen.runtime import mma_upcast



@triton.jit
def lora_linear_kernel(x_ptr, xa_ptr, w_ptr, b_ptr, a_ptr, bb_ptr, res_ptr, y_ptr,
                       M, N, K, R, scale,
                       sxm, sxk, sam, sak, swn, swk, sAr, sAk, sBn, sBr, srm, srn, sym, syn,
                       HAS_BIAS: tl.constexpr, HAS_XA: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        at = tl.load(a_ptr + rk[:, None] * sAk + rr[None, :] * sAr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if HAS_XA:
            xa = tl.load(xa_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
        else:
            xa = x
        if UPCAST:
            x = x.to(tl.float32)
            xa = xa.to(tl.float32)
            wt = wt.to(tl.float32)
            at = at.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, wt, acc, input_precision="ieee", out_dtype=tl.float32)
            h = tl.dot(xa, at, h, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc = tl.dot(x, wt, acc, out_dtype=tl.float32)
            h = tl.dot(xa, at, h, out_dtype=tl.float32)
    bt = tl.load(bb_ptr + rr[:, None] * sBr + rn[None, :] * sBn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    h = h * scale
    if UPCAST:
        bt = bt.to(tl.float32)
    else:
        h = h.to(bb_ptr.dtype.element_ty)   # s·h rounded to the input dtype (one dtype per tl.dot)
    if IEEE:
        acc = tl.dot(h, bt, acc, input_precision="ieee", out_dtype=tl.float32)
    else:
        acc = tl.dot(h, bt, acc, out_dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if ACT == 1:
        acc = tl_math.gelu_erf(acc)
    if ACT == 2:
        acc = tl_math.gelu_tanh(acc)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=out_mask, other=0.0).to(tl.float32)
        acc = acc + res
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def rank_block(R: int) -> int:
    """BR: the rank padded to a power of two ≥ 16 (tl.dot needs K ≥ 16 on GPU)."""
    return _pow2_at_least(R, 16)


_TUNED = None
GPU_CONFIGS = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
               (128, 128, 64, 8, 3), (32, 64, 64, 4, 4), (16, 64, 64, 4, 4), (16, 128, 64, 4, 3)]
INTERPRETER_CONFIGS = [(32, 32, 32, 4, 1), (64, 64, 64, 4, 1)]      # (BM, BN, BK, warps, stages)


def autotuned():
    """The kernel autotuned per (M, N, K, R, epilogue) over a few tile shapes (GPU), or two small ones timed on
    the CPU under the interpreter; launch() uses it whenever no explicit blocks are given."""
    global _TUNED
    if _TUNED is None:
        def configs(table):
            return [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=st) for bm, bn, bk, w, st in table]
        _TUNED = runtime.autotune(lora_linear_kernel, ["M", "N", "K", "R", "HAS_RES", "ACT"],
                                  configs(GPU_CONFIGS), configs(INTERPRETER_CONFIGS))
    return _TUNED


def supported(x, weight, bias, lora_a, lora_b, adapter_input, residual) -> str | None:
    """None when the kernel handles these inputs, else the reason it does not."""
    dt = x.dtype
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dt} has no kernel"
    for t in (weight, bias, lora_a, lora_b, adapter_input, residual):
        if t is not None and t.dtype != dt:
            return "mixed dtypes"
    if lora_a.shape[0] > 128:
        return "rank > 128"
    return None


def launch(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none", residual=None,
           blocks: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel. `out` (shape (rows, N), any strides) receives the result; tests pass guarded views."""
    K = x.shape[-1]
    N, R = weight.shape[0], lora_a.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    xa2 = adapter_input.reshape(-1, K) if adapter_input is not None else x2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    res2 = residual.broadcast_to(*x.shape[:-1], N).reshape(M, N) if residual is not None else y
    upcast = mma_upcast(x.dtype)
    args = (x2, xa2, weight, bias if bias is not None else y, lora_a, lora_b, res2, y,
            M, N, K, R, float(scale),
            x2.stride(0), x2.stride(1), xa2.stride(0), xa2.stride(1), weight.stride(0), weight.stride(1),
            lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
            res2.stride(0), res2.stride(1), y.stride(0), y.stride(1))
    flags = dict(HAS_BIAS=bias is not None, HAS_XA=adapter_input is not None, ACT=ACTIVATIONS[activation],
                 HAS_RES=residual is not None, UPCAST=upcast, IEEE=x.dtype == torch.float32)
    if M > 0 and N > 0:
        if blocks is None:
            grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))  # noqa: E731
            autotuned()[grid](*args, **flags, BR=rank_block(R))
        else:
            lora_linear_kernel[(triton.cdiv(M, blocks["BM"]), triton.cdiv(N, blocks["BN"]))](*args, **flags, **blocks)
    return y.reshape(*x.shape[:-1], N) if out is None else out


def reference(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none", residual=None):
    """The same computation with torch ops (the base op's formula, then the epilogue)."""
    import torch.nn.functional as F
    xa = x if adapter_input is None else adapter_input
    y = F.linear(x, weight, bias) + scale * F.linear(F.linear(xa, lora_a), lora_b)
    return epilogue(y, activation, residual)
