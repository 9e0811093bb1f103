"""VQ logits: code logits, then the token gather as a copy (rewrite::vq_logits, rewriter/ops/vq_logits.py).

    l = h·Cᵀ (K codes)     out[row, v] = l[row, map[v]] (+ b[v]) − shift[row]
    shift = 0                                          plain logits
    shift = logsumexp_c(l_c + log|c|)                  log_softmax, no bias (O(K) per row)
    shift = logsumexp_v(l[map[v]] + b[v])              log_softmax + bias (a sweep over V per row)

Three launches, each doing one thing at the speed of its own bound:
    code logits   the GEMM template (codegen/templates/gemm.py), rows × K in the input dtype — or cuBLAS
                  (F.linear) in the "cublas+gather" candidate: a plain GEMM is cuBLAS's home ground
    vq_lse_kernel (log_softmax only) one program per BM rows: an online (max, sum) over the K codes or over V
    vq_gather_kernel  grid (row tiles, V tiles): each program loads BV entries of the map once and, for its BM
                  rows, gathers l[row, map[v]] (rows · K values: L1/L2-resident), adds bias and −shift in fp32
                  and stores a (BM, BV) tile — the V-wide output is written once and nothing else V-wide is
                  read except the map (and bias), so it runs at the speed of writing that output.
The dense head costs rows·V·d FLOPs and reads V·d weights; this costs rows·K·d and writes rows·V values.

Candidates for codegen.select: the Triton code logits + gather with BV ∈ {256, 1024} (small V tiles give a decode
step (one row) enough programs to fill the GPU; wide ones amortise the map loads over many rows), cuBLAS code
logits + the gather, and the aten path (F.linear, then index_select).

Precision (codegen.runtime.mma_upcast): fp16 (and bf16 on a GPU) h and C go to tl.dot as loaded — tensor-core
MMA, fp32 accumulation. The code logits l are rounded to the input dtype (as the op's F.linear returns them);
bias, the shift and the subtraction are fp32, rounded once at the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen.runtime import cdiv, interpreter
from codegen.select import Candidate
from codegen.templates import gemm
from codegen.templates.gemm import Tiles


@triton.jit
def vq_lse_kernel(l_ptr, map_ptr, b_ptr, ls_ptr, shift_ptr, M, K, V, slm, slk, smap, sb,
                  FULL: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """shift[row] = logsumexp over the K codes of l + log|c| (FULL = 0) or over V of l[map[v]] + b[v] (FULL)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = rm < M
    run_max = tl.full((BM,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BM,), dtype=tl.float32)
    if FULL:
        n = V
    else:
        n = K
    for c0 in range(0, n, BC):
        rc = c0 + tl.arange(0, BC)
        c_ok = rc < n
        if FULL:
            idx = tl.load(map_ptr + rc * smap, mask=c_ok, other=0).to(tl.int32)
            z = tl.load(l_ptr + rm[:, None] * slm + idx[None, :] * slk, mask=m_ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            z += tl.load(b_ptr + rc * sb, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        else:
            z = tl.load(l_ptr + rm[:, None] * slm + rc[None, :] * slk, mask=m_ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            z += tl.load(ls_ptr + rc, mask=c_ok, other=0.0)[None, :]
        z = tl.where(c_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
        run_max = new_max
    tl.store(shift_ptr + rm, run_max + tl.log(run_sum), mask=m_ok)


@triton.jit
def vq_gather_kernel(l_ptr, map_ptr, b_ptr, shift_ptr, y_ptr, M, V, slm, slk, smap, sb, sym, syv,
                     HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)      # row tiles on axis 0 (no 65,535 limit), V tiles on 1
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    v_ok = rv < V
    m_ok = rm < M
    idx = tl.load(map_ptr + rv * smap, mask=v_ok, other=0).to(tl.int32)       # the map, read once per tile
    mask = m_ok[:, None] & v_ok[None, :]
    out = tl.load(l_ptr + rm[:, None] * slm + idx[None, :] * slk, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(b_ptr + rv * sb, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        out -= tl.load(shift_ptr + rm, mask=m_ok, other=0.0)[:, None]
    tl.store(y_ptr + rm[:, None] * sym + rv[None, :] * syv, out.to(y_ptr.dtype.element_ty), mask=mask)


def supported(h, codebook, code_map, bias) -> str | None:
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {h.dtype} has no kernel"
    if codebook.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        return "mixed dtypes"
    if code_map.dtype not in (torch.int32, torch.int64):
        return f"code map dtype {code_map.dtype}"
    return None


def gather_blocks(rows: int, vocab: int, bv: int | None = None) -> tuple[int, int]:
    """(BM, BV): BV wide enough to amortise the map loads, ≤ 4096 elements per tile (16 fp32 registers per
    thread at 8 warps); under the interpreter small tiles (its cost grows with programs × tile size)."""
    if interpreter():
        return min(16, gemm.pow2(rows, 1)), bv or min(64, gemm.pow2(vocab))
    bv = bv or (256 if rows <= 4 else 1024)
    return min(gemm.pow2(rows, 1), max(1, 4096 // bv)), bv


def launch(h, codebook, code_map, bias=None, log_softmax: bool = False, tiles: Tiles | None = None,
           bv: int | None = None, bm: int | None = None, cublas: bool = False,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """rewrite::vq_logits. `tiles`: the code-logit GEMM's (default heuristic); `cublas`: F.linear computes the code
    logits instead; `bv`/`bm`: the gather's tile; `out` (rows, V), any strides, gets the result."""
    from rewriter.ops.vq_logits import log_cluster_sizes
    d = h.shape[-1]
    k = codebook.shape[0]
    vocab = code_map.shape[0]
    h2 = h.reshape(-1, d)
    rows = h2.shape[0]
    y = torch.empty(rows, vocab, dtype=h.dtype, device=h.device) if out is None else out
    if rows and vocab:
        if cublas:
            logits = gemm.dense_linear(h2, codebook)
        else:
            logits = torch.empty(rows, k, dtype=h.dtype, device=h.device)
            gemm.launch(h2, codebook.unsqueeze(0), logits, M_out=k, tiles=tiles)
        shift = None
        if log_softmax:
            shift = torch.empty(rows, dtype=torch.float32, device=h.device)
            full = bias is not None
            ls = log_cluster_sizes(code_map, k) if not full else shift
            bml = min(4 if full else 16, gemm.pow2(rows, 1))       # a sweep over V per row: more programs
            bc = 64 if interpreter() else 1024
            vq_lse_kernel[(cdiv(rows, bml),)](
                logits, code_map, bias if full else shift, ls, shift, rows, k, vocab, logits.stride(0),
                logits.stride(1), code_map.stride(0), bias.stride(0) if full else 0,
                FULL=full, BM=bml, BC=min(bc, gemm.pow2(vocab if full else k)))
        gbm, gbv = gather_blocks(rows, vocab, bv)
        gbm = bm or gbm
        vq_gather_kernel[(cdiv(rows, gbm), cdiv(vocab, gbv))](
            logits, code_map, bias if bias is not None else y, shift if shift is not None else y, y, rows, vocab,
            logits.stride(0), logits.stride(1), code_map.stride(0), bias.stride(0) if bias is not None else 0,
            y.stride(0), y.stride(1), HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None, BM=gbm, BV=gbv)
    return y.reshape(*h.shape[:-1], vocab) if out is None else out


def reference(h, codebook, code_map, bias=None, log_softmax=False):
    from rewriter.ops import vq_logits as op
    return op.reference(h, codebook, code_map, bias, log_softmax)


def candidates(h, codebook, code_map, bias=None, log_softmax=False):
    args = (h, codebook, code_map, bias, log_softmax)
    rows = h.numel() // h.shape[-1] if h.shape[-1] else 0
    first = gather_blocks(rows, code_map.shape[0])[1]
    widths = [first] + ([] if interpreter() else [bv for bv in (256, 1024) if bv != first])
    out = [Candidate(f"triton[gemm+gather bv{bv}]", "triton", lambda bv=bv: launch(*args, bv=bv)) for bv in widths]
    out.append(Candidate("cublas+triton-gather", "triton", lambda: launch(*args, cublas=True)))
    out.append(Candidate("aten", "aten", lambda: reference(*args)))
    return out
