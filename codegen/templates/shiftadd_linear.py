"""ShiftAdd (BCQ) LUT GEMV/GEMM for rewrite::shiftadd_linear (layout and math: rewriter/bcq.py).

    signs      uint8 (q, out, in_pad/8): bit u of byte k of plane i is the sign of column 8k+u
    exponents  int8  (out, G, q, terms): the scale of (row, group, plane) is Σₜ 2^e, e = −128 meaning 0
    y[r] = Σ_j Σ_i Σ_t 2^e[r, j, i, t] · Σ_{bytes k of group j} lut[k, signs[i, r, k]] (+ b[r])
    lut[k, idx] = Σ_u (2·bit_u(idx) − 1)·x[8k + u]            (256 signed partial sums per 8 activations)

Two kernels per call:
    lut_build_kernel   grid (row blocks, byte blocks): the 256-entry tables of every row, computed directly
                       (8 selects and adds per entry, x's padding to in_pad a load mask) into an fp32 buffer
                       (rows, in_pad/8, 256) that is built once and shared by every output block.
    lut_gemv_kernel    grid (row blocks of BM, output blocks of BO): per group j and plane i, the (BO, g/8)
                       tile of sign bytes (read once for the BM rows: BM = 1 is the GEMV) indexes the tables
                       (tl.load(lut + idx): a gather, no multiply); the row sums are the group's partial sums;
                       they are scaled by exp2 of the int8 exponents (exact powers of two) and accumulated in
                       fp32. No weight is ever dequantised.
Loads upcast to fp32; the output is cast to x's dtype.

The tables take rows · in_pad/8 · 256 · 4 bytes (512 KiB per row at 4096 inputs): they pay off for GEMV-sized
inputs (decoding, ShiftAddLLM's setting). Past LUT_BYTES_MAX (a prefill of many tokens), rewrite_triton's op
dequantises and runs one dense GEMM instead (`lut_pays_off`), by design rather than as a fallback.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen.runtime import interpreter

ZERO_EXP = -128
LUT_BYTES_MAX = 32 << 20


def lut_pays_off(rows: int, signs: torch.Tensor) -> bool:
    """True when the rows' tables fit in LUT_BYTES_MAX (else: dequantise + one GEMM)."""
    return rows * signs.shape[2] * 256 * 4 <= LUT_BYTES_MAX


@triton.jit
def lut_build_kernel(x_ptr, lut_ptr, M, N_IN, NBYTES, sxm, sxk, BM: tl.constexpr, BB: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    kb = tl.program_id(1) * BB + tl.arange(0, BB)
    m_ok = rm < M
    k_ok = kb < NBYTES
    entry = tl.arange(0, 256)
    lut = tl.zeros((BM, BB, 256), dtype=tl.float32)
    for u in tl.static_range(8):
        col = kb * 8 + u
        xu = tl.load(x_ptr + rm[:, None] * sxm + col[None, :] * sxk,
                     mask=m_ok[:, None] & (k_ok & (col < N_IN))[None, :], other=0.0).to(tl.float32)
        bit = (entry >> u) & 1
        lut += tl.where(bit[None, None, :] == 1, xu[:, :, None], -xu[:, :, None])
    tl.store(lut_ptr + (rm[:, None, None] * NBYTES + kb[None, :, None]) * 256 + entry[None, None, :], lut,
             mask=m_ok[:, None, None] & k_ok[None, :, None])


@triton.jit
def lut_gemv_kernel(lut_ptr, s_ptr, e_ptr, b_ptr, y_ptr,
                    M, OUT, NBYTES, GROUPS, BYTES_PER_GROUP, PLANES, TERMS,
                    ssi, sso, ssk, seo, seg, sei, set, sym, syn,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BKB: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    ro = tl.program_id(1) * BO + tl.arange(0, BO)
    m_ok = rm < M
    o_ok = ro < OUT
    kk = tl.arange(0, BKB)
    kk_ok = kk < BYTES_PER_GROUP
    lut_rows = lut_ptr + rm[:, None, None] * (NBYTES * 256)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for j in range(0, GROUPS):
        kb = j * BYTES_PER_GROUP + kk
        tile_ok = o_ok[:, None] & kk_ok[None, :]
        for i in range(0, PLANES):
            # the (BO, bytes of group j) sign bytes of plane i, read once for all BM rows
            idx = tl.load(s_ptr + i * ssi + ro[:, None] * sso + kb[None, :] * ssk, mask=tile_ok, other=0)
            vals = tl.load(lut_rows + (kb[None, :] * 256 + idx.to(tl.int32))[None, :, :],
                           mask=m_ok[:, None, None] & tile_ok[None, :, :], other=0.0)
            part = tl.sum(vals, axis=2)                                   # (BM, BO) group partial sums
            for t in range(0, TERMS):
                e = tl.load(e_ptr + ro * seo + j * seg + i * sei + t * set, mask=o_ok, other=-128).to(tl.int32)
                scale = tl.where(e == -128, 0.0, tl.exp2(e.to(tl.float32)))
                acc += part * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + ro, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + ro[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & o_ok[None, :])


def pick_blocks(rows: int, out_features: int, nbytes: int, bytes_per_group: int) -> dict:
    hi = 64 if interpreter() else 128
    return dict(BM=min(16 if interpreter() else 4, triton.next_power_of_2(max(rows, 1))),
                BO=min(hi, max(16, triton.next_power_of_2(out_features))),
                BKB=max(1, triton.next_power_of_2(bytes_per_group)),
                BB=min(32 if interpreter() else 64, max(1, triton.next_power_of_2(nbytes))))


def supported(x, signs, exponents, bias, in_features, group) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} has no kernel"
    if signs.dtype != torch.uint8 or exponents.dtype != torch.int8:
        return "signs must be uint8 and exponents int8"
    if group % 8 or signs.shape[2] * 8 != exponents.shape[1] * group:
        return "group does not match the packed layout"
    return None


def launch(x, signs, exponents, bias, in_features: int, group: int, blocks: dict | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ b) through the tables; `out` (rows, out), any strides, gets the result."""
    q, out_f, nbytes = signs.shape
    groups, terms = exponents.shape[1], exponents.shape[3]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    y = torch.empty(rows, out_f, dtype=x.dtype, device=x.device) if out is None else out
    b = blocks or pick_blocks(rows, out_f, nbytes, group // 8)
    if rows and out_f:
        lut = torch.empty(rows, nbytes, 256, dtype=torch.float32, device=x.device)
        row_blocks = triton.cdiv(rows, b["BM"])
        lut_build_kernel[(row_blocks, triton.cdiv(nbytes, b["BB"]))](x2, lut, rows, int(in_features), nbytes,
                                                                     x2.stride(0), x2.stride(1),
                                                                     BM=b["BM"], BB=b["BB"])
        lut_gemv_kernel[(row_blocks, triton.cdiv(out_f, b["BO"]))](
            lut, signs, exponents, bias if bias is not None else y, y,
            rows, out_f, nbytes, groups, group // 8, q, terms,
            signs.stride(0), signs.stride(1), signs.stride(2),
            exponents.stride(0), exponents.stride(1), exponents.stride(2), exponents.stride(3),
            y.stride(0), y.stride(1), HAS_BIAS=bias is not None, BM=b["BM"], BO=b["BO"], BKB=b["BKB"])
    return y.reshape(*x.shape[:-1], out_f) if out is None else out


def reference(x, signs, exponents, bias, in_features, group):
    from rewriter.ops import shiftadd_linear as op
    return op.reference(x, signs, exponents, bias, in_features, group)
