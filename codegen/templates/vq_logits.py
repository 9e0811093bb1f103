"""VQ logits: code logits and the token gather in one kernel (rewrite::vq_logits, rewriter/ops/vq_logits.py).

    l = h·Cᵀ (K codes)     out[row, v] = l[row, map[v]] (+ b[v])
    log_softmax, no bias:  out = l[map[v]] − LSE,  LSE = logsumexp_c(l_c + log|c|)      (O(K) per row)
    log_softmax + bias:    out = z_v − logsumexp_v(z_v),  z_v = l[map[v]] + b[v]       (two sweeps over V)

One program owns BM rows and a chunk of the vocabulary. Phase 1 computes its rows' code logits in (BM, BC) tiles
(tl.dot over d) into a program-private fp32 scratch row (BM, K) in global memory — it stays in L1/L2 — and, for
log_softmax, folds l + log|c| into an online (max, sum). A barrier, then phase 2 walks its vocabulary chunk in BV
columns: map[v] is loaded once per tile and addresses the scratch (the gather is pointer arithmetic, no V×K
one-hot product); bias and −LSE are added in registers and the (BM, BV) tile is stored. The V-sized logits are
written once and never re-read (the dense head's cost is N·V·d FLOPs; this is N·K·d + a copy). BC, BD ≥ 16.

Precision (UPCAST = codegen.runtime.mma_upcast(dtype)): fp32 inputs are dotted as fp32 (IEEE), bf16 under the
interpreter is upcast to fp32. fp16 (and bf16 on a GPU) h and C go to tl.dot as loaded — tensor-core MMA, fp32
accumulation. The code logits l are rounded to the input dtype (as the reference's F.linear returns them) and kept
in the fp32 scratch; bias, LSE and the log-softmax shift are fp32, rounded once at the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen.runtime import interpreter, mma_upcast


@triton.jit
def vq_logits_kernel(h_ptr, c_ptr, map_ptr, b_ptr, ls_ptr, scr_ptr, y_ptr,
                     M, D, K, V, KP, V_CHUNK,
                     shm, shd, sck, scd, smap, sb, sym, syv,
                     HAS_BIAS: tl.constexpr, LSE_CODES: tl.constexpr, LSE_FULL: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rl = tl.arange(0, BM)
    rm = pid_m * BM + rl
    m_ok = rm < M
    scr = scr_ptr + (pid_m * tl.num_programs(1) + pid_v) * BM * KP
    run_max = tl.full((BM,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, K, BC):
        rc = c0 + tl.arange(0, BC)
        c_ok = rc < K
        lg = tl.zeros((BM, BC), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            d_ok = rd < D
            h = tl.load(h_ptr + rm[:, None] * shm + rd[None, :] * shd, mask=m_ok[:, None] & d_ok[None, :],
                        other=0.0)
            ct = tl.load(c_ptr + rc[None, :] * sck + rd[:, None] * scd, mask=c_ok[None, :] & d_ok[:, None],
                         other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                ct = ct.to(tl.float32)
            if IEEE:
                lg = tl.dot(h, ct, lg, input_precision="ieee", out_dtype=tl.float32)
            else:
                lg = tl.dot(h, ct, lg, out_dtype=tl.float32)
        lg = lg.to(h_ptr.dtype.element_ty).to(tl.float32)   # the op's code logits are in the input dtype
        tl.store(scr + rl[:, None] * KP + rc[None, :], lg)
        if LSE_CODES:
            z = lg + tl.load(ls_ptr + rc, mask=c_ok, other=float("-inf"))[None, :]
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
            run_max = new_max
    tl.debug_barrier()   # the scratch written above is read back (gathered) by other threads of this program
    v_lo = pid_v * V_CHUNK
    v_hi = tl.minimum(v_lo + V_CHUNK, V)
    shift = tl.zeros((BM,), dtype=tl.float32)
    if LSE_CODES:
        shift = run_max + tl.log(run_sum)
    if LSE_FULL:   # first sweep: logsumexp over the vocabulary of z_v = l[map[v]] + b[v]
        for v0 in range(v_lo, v_hi, BV):
            rv = v0 + tl.arange(0, BV)
            v_ok = rv < v_hi
            idx = tl.load(map_ptr + rv * smap, mask=v_ok, other=0).to(tl.int32)
            z = tl.load(scr + rl[:, None] * KP + idx[None, :], mask=v_ok[None, :], other=0.0)
            z = z + tl.load(b_ptr + rv * sb, mask=v_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.where(v_ok[None, :], z, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
        shift = run_max + tl.log(run_sum)
    for v0 in range(v_lo, v_hi, BV):
        rv = v0 + tl.arange(0, BV)
        v_ok = rv < v_hi
        idx = tl.load(map_ptr + rv * smap, mask=v_ok, other=0).to(tl.int32)
        out = tl.load(scr + rl[:, None] * KP + idx[None, :], mask=v_ok[None, :], other=0.0)
        if HAS_BIAS:
            out = out + tl.load(b_ptr + rv * sb, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        out = out - shift[:, None]
        tl.store(y_ptr + rm[:, None] * sym + rv[None, :] * syv, out.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & v_ok[None, :])


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(v, hi) if hi is not None else v


def pick_blocks(M: int, D: int, K: int, V: int) -> dict:
    if interpreter():
        return dict(BM=_pow2(M, hi=32), BD=_pow2(D, hi=64), BC=_pow2(K, hi=64), BV=_pow2(V, hi=64))
    return dict(BM=_pow2(M, hi=32), BD=_pow2(D, hi=64), BC=_pow2(K, hi=64), BV=_pow2(V, hi=256))


def supported(h, codebook, code_map, bias) -> str | None:
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {h.dtype} has no kernel"
    if codebook.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        return "mixed dtypes"
    if code_map.dtype not in (torch.int32, torch.int64):
        return f"code map dtype {code_map.dtype}"
    return None


def launch(h, codebook, code_map, bias=None, log_softmax: bool = False, blocks: dict | None = None,
           v_chunk: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """rewrite::vq_logits. `v_chunk` (a multiple of BV) sets the vocabulary per program; `out` (rows, V), any
    strides, gets the result."""
    from rewriter.ops.vq_logits import log_cluster_sizes
    d = h.shape[-1]
    k = codebook.shape[0]
    vocab = code_map.shape[0]
    h2 = h.reshape(-1, d)
    rows = h2.shape[0]
    y = torch.empty(rows, vocab, dtype=h.dtype, device=h.device) if out is None else out
    b = blocks or pick_blocks(rows, d, k, vocab)
    lse_full = bool(log_softmax) and bias is not None
    lse_codes = bool(log_softmax) and bias is None
    if v_chunk is None:
        v_chunk = b["BV"] * (4 if interpreter() else 2)
    if lse_full:
        v_chunk = vocab     # the normaliser needs the whole row: one program per row block
    if rows and vocab:
        grid = (triton.cdiv(rows, b["BM"]), triton.cdiv(vocab, v_chunk))
        kp = triton.cdiv(k, b["BC"]) * b["BC"]
        scratch = torch.empty(grid[0] * grid[1] * b["BM"] * kp, dtype=torch.float32, device=h.device)
        ls = log_cluster_sizes(code_map, k) if lse_codes else scratch
        vq_logits_kernel[grid](
            h2, codebook, code_map, bias if bias is not None else y, ls, scratch, y,
            rows, d, k, vocab, kp, v_chunk,
            h2.stride(0), h2.stride(1), codebook.stride(0), codebook.stride(1), code_map.stride(0),
            bias.stride(0) if bias is not None else 0, y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, LSE_CODES=lse_codes, LSE_FULL=lse_full, UPCAST=mma_upcast(h.dtype),
            IEEE=h.dtype == torch.float32, **b)
    return y.reshape(*h.shape[:-1], vocab) if out is None else out


def reference(h, codebook, code_map, bias=None, log_softmax=False):
    from rewriter.ops import vq_logits as op
    return op.reference(h, codebook, code_map, bias, log_softmax)
