"""One GEMM template for every matmul-shaped kernel: LoRA, Monarch, block-diagonal / BlockDense, low-rank.

    y[m, col(k, n)] = epi( α · Σ_r x[m, k·P + r] · w[k, n, r]          the main loop (block k of NB)
                           + Σ_j x2[m, j] · w2[n, j]                     HAS_EXTRA: a short second K loop
                           + c[m, col] + bias[col] )                     HAS_C, HAS_BIAS
    epi(v) = act(v) + res[m, col]                                        ACT (0 none, 1 GELU-erf, 2 GELU-tanh),
                                                                         HAS_RES

NB blocks of a block-diagonal weight w (NB, T, P): block k reads x's columns k·P … k·P+P−1 (zero padded past
N_IN: a load mask) and writes T outputs; a plain linear is NB = 1 (w = W viewed (1, N, K)). Where those outputs
go (OUT, constexpr) carries the Monarch permutations, so no permuted copy of anything is ever made:

    OUT 0  col = k·T + n                      plain (a block-diagonal output, or a linear for NB = 1); col < M_OUT
    OUT 1  f = k·T + n, stored at (f mod NB)·T + ⌊f / NB⌋     P₁ of Monarch: h (b, q) → g (q, b) transposed,
                                                              so block c of the next GEMM reads g[c, ·] at
                                                              columns c·T … c·T+T−1
    OUT 2  col = n·NB + k                     P₂ of Monarch: output o = s'·b + c; col < M_OUT

Callers compose it: LoRA = h = s·(x_a·Aᵀ) (a GEMM with α = s, N = r), then y = x·Wᵀ + h·Bᵀ + b (the main loop
is a plain GEMM's; the adapter is the extra loop of r/BR ≤ 8 steps after it); Monarch = g = P₁(R·x) (OUT 1),
then y = P₂(L·g) (OUT 2) with the epilogue; BlockDense = h = blockdiag(x), then y = h·Uᵀ; low rank = h = x·Vᵀ,
then y = h·Uᵀ. Each intermediate is written once in the input dtype (fp32 when the dots are upcast) and read
once, so every FLOP of the factorisation is done once (no recomputation per output tile).

Program order: the block index is the fastest-varying one, so the NB programs that own the same output tile
of every block run side by side. Monarch's P₁ and P₂ interleave the blocks' columns (block c writes every b-th
column), so each program's stores touch one element per 32-byte sector; run together, the b programs of a row
tile fill those sectors while they sit in L2, instead of each sector being written back b times.

Tiles (GPU): the usual Hopper/Ampere GEMM shapes — 128×128 or 128×256 output tiles, K step 64, 8 warps and 3
stages, or 64×128 / 64×64 with 4 warps and 4 stages — clamped to the problem (a 64-wide block does not get a
256-wide tile), programs in grouped order (GROUP_M row tiles sweep the column tiles together, so neighbouring
programs share x rows and w columns in L2). Rows and columns of the loads are wrapped modulo M and T, so loads
need a mask only on the K tail; stores are masked.

Precision (UPCAST = codegen.runtime.mma_upcast(dtype), IEEE for fp32 inputs: exact fp32 dots, the GPU default
being TF32): fp16 (and bf16 on a GPU) operands go to tl.dot as loaded — tensor-core MMA, fp32 accumulation; the
accumulator, α, bias, activation and residual are fp32, rounded once at the store.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from codegen import tl_math
from codegen.runtime import cdiv, interpreter, mma_upcast, next_pow2

OUT_PLAIN, OUT_P1, OUT_P2 = 0, 1, 2


@triton.jit
def block_gemm_kernel(x_ptr, w_ptr, x2_ptr, w2_ptr, c_ptr, b_ptr, res_ptr, y_ptr,
                      M, N_IN, NB, P, T, M_OUT, R, alpha,
                      sxm, sxk, swb, swn, swk, s2m, s2k, s2n, s2r, scm, scn, srm, srn, sym, syn,
                      OUT: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ACT: tl.constexpr, HAS_RES: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(T, BN)
    k = pid % NB                                    # the block innermost: see "Program order" above
    local = pid // NB
    in_group = GROUP_M * tiles_n                    # grouped order: GROUP_M row tiles sweep the columns together
    first_m = (local // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (local % in_group) % group_rows
    pid_n = (local % in_group) // group_rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    lm = rm % M                                     # wrapped: loads stay in bounds without a mask
    ln = rn % T
    k_len = tl.minimum(P, N_IN - k * P)             # x's zero padding past N_IN is the K-tail mask
    x_ptrs = x_ptr + lm[:, None] * sxm + (k * P + rk)[None, :] * sxk
    w_ptrs = w_ptr + k * swb + ln[None, :] * swn + rk[:, None] * swk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, k_len, BK):
        kk = rk < k_len - r0
        a = tl.load(x_ptrs, mask=kk[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=kk[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        x_ptrs += BK * sxk
        w_ptrs += BK * swk
    acc = acc * alpha
    if HAS_EXTRA:                                   # + x2·w2ᵀ: LoRA's rank-r term, a short second K loop
        rj = tl.arange(0, BR)
        for j0 in range(0, R, BR):
            jj = rj < R - j0
            h = tl.load(x2_ptr + lm[:, None] * s2m + (j0 + rj)[None, :] * s2k, mask=jj[None, :], other=0.0)
            u = tl.load(w2_ptr + ln[None, :] * s2n + (j0 + rj)[:, None] * s2r, mask=jj[:, None], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                u = u.to(tl.float32)
            if IEEE:
                acc = tl.dot(h, u, acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(h, u, acc, out_dtype=tl.float32)
    m_ok = rm < M
    n_ok = rn < T
    if OUT == 1:
        f = k * T + rn
        col = (f % NB) * T + f // NB
        col_ok = n_ok
    elif OUT == 2:
        col = rn * NB + k
        col_ok = n_ok & (col < M_OUT)
    else:
        col = k * T + rn
        col_ok = n_ok & (col < M_OUT)
    mask = m_ok[:, None] & col_ok[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + rm[:, None] * scm + col[None, :] * scn, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl_math.gelu_erf(acc)
    if ACT == 2:
        acc = tl_math.gelu_tanh(acc)
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * srm + col[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * sym + col[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tma_gemm_kernel(x_ptr, w_ptr, x2_ptr, w2_ptr, c_ptr, b_ptr, res_ptr, y_ptr,
                    M, N, K, R, alpha,
                    sxm, swn, s2m, s2k, s2n, s2r, scm, scn, srm, srn, sym, syn,
                    HAS_EXTRA: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    HAS_RES: tl.constexpr, WS: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):
    """The plain (NB = 1, OUT 0) GEMM with Hopper's tensor-memory-accelerator loads: x and w tiles come through
    TMA descriptors (bounds and zero fill in hardware, no address arithmetic or masks in the main loop); WS asks
    Triton to warp-specialise the loop (producer warps issue the loads, consumer warps the MMAs). The adapter
    loop and the epilogue are the pointer-based ones of block_gemm_kernel. fp16 / bf16 only."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[sxm, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[swn, 1], block_shape=[BN, BK])
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if WS:
        for kk in tl.range(0, tl.cdiv(K, BK), warp_specialize=True):
            a = x_desc.load([pid_m * BM, kk * BK])
            b = w_desc.load([pid_n * BN, kk * BK])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.float32)
    else:
        for kk in range(0, tl.cdiv(K, BK)):
            a = x_desc.load([pid_m * BM, kk * BK])
            b = w_desc.load([pid_n * BN, kk * BK])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.float32)
    acc = acc * alpha
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    if HAS_EXTRA:
        lm = rm % M
        ln = rn % N
        rj = tl.arange(0, BR)
        for j0 in range(0, R, BR):
            jj = rj < R - j0
            h = tl.load(x2_ptr + lm[:, None] * s2m + (j0 + rj)[None, :] * s2k, mask=jj[None, :], other=0.0)
            u = tl.load(w2_ptr + ln[None, :] * s2n + (j0 + rj)[:, None] * s2r, mask=jj[:, None], other=0.0)
            acc = tl.dot(h, u, acc, out_dtype=tl.float32)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + rm[:, None] * scm + rn[None, :] * scn, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl_math.gelu_erf(acc)
    if ACT == 2:
        acc = tl_math.gelu_tanh(acc)
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration: output tile BM × BN, K step BK, grouped order over GROUP_M row tiles."""
    BM: int
    BN: int
    BK: int
    warps: int = 4
    stages: int = 3
    GROUP_M: int = 8
    tma: bool = False         # plain GEMMs through tma_gemm_kernel (Hopper), where the operands allow
    ws: bool = False          # … with a warp-specialised main loop

    @property
    def name(self) -> str:
        return _tile_name(self)

    def clamp(self, M: int, T: int, P: int) -> "Tiles":
        """The tile shrunk to the problem (powers of two ≥ 16: tl.dot needs every dim ≥ 16 on a GPU)."""
        return Tiles(min(self.BM, pow2(M)), min(self.BN, pow2(T)), min(self.BK, pow2(P)), self.warps, self.stages,
                     self.GROUP_M, self.tma, self.ws)


@functools.lru_cache(maxsize=256)
def _tile_name(t: Tiles) -> str:
    return f"{t.BM}x{t.BN}x{t.BK}w{t.warps}s{t.stages}" + ("-tma" if t.tma else "") + ("-ws" if t.ws else "")


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(max(int(n), 1)))


# GPU candidates, tried in this order when nothing is measured (the first is the heuristic default); fp32 tiles
# hold twice the bytes, so fp32 gets K step 32 (three 128×128 stages of 32: 96 KiB, under the A100's 163 KiB)
GPU_TILES = (Tiles(128, 128, 64, 8, 3), Tiles(128, 256, 64, 8, 3), Tiles(64, 128, 64, 4, 4), Tiles(64, 64, 64, 4, 4))
GPU_TILES_FP32 = (Tiles(128, 128, 32, 8, 3), Tiles(64, 128, 32, 4, 3), Tiles(64, 64, 32, 4, 4))
INTERPRETER_TILES = (Tiles(32, 32, 32, 4, 1), Tiles(16, 16, 16, 4, 1))


TMA_TILES = (Tiles(128, 256, 64, 8, 3, tma=True), Tiles(128, 128, 64, 8, 4, tma=True),
             Tiles(128, 256, 64, 8, 3, tma=True, ws=True))
RECORD_TMA = [False]          # codegen.compile_check sets it: record the TMA candidates without a Hopper GPU


def hopper(t: torch.Tensor) -> bool:
    """Whether TMA candidates apply: a CUDA tensor on compute capability ≥ 9 (or compile_check recording)."""
    if RECORD_TMA[0]:
        return True
    return t.is_cuda and _capability(t.device.index or 0) >= 9


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def candidate_tiles(M: int, T: int, P: int, dtype: torch.dtype, tma: bool = False) -> list[Tiles]:
    """The distinct configurations worth timing for a GEMM of M rows, T outputs per block and K = P; with `tma`
    (a plain GEMM on a Hopper GPU, fp16/bf16) also the TMA variants."""
    tma = tma and dtype in (torch.float16, torch.bfloat16) and not interpreter()
    return list(_candidate_tiles(next_pow2(M), next_pow2(T), next_pow2(P), dtype == torch.float32, interpreter(),
                                 tma))


@functools.lru_cache(maxsize=4096)
def _candidate_tiles(M: int, T: int, P: int, fp32: bool, interp: bool, tma: bool) -> tuple:
    table = INTERPRETER_TILES if interp else GPU_TILES_FP32 if fp32 else GPU_TILES + (TMA_TILES if tma else ())
    out = []
    for t in table:
        c = t.clamp(M, T, P)
        if c not in out:
            out.append(c)
    return tuple(out)


def default_tiles(M: int, T: int, P: int, dtype: torch.dtype) -> Tiles:
    return candidate_tiles(M, T, P, dtype)[0]


def launch(x2d, w3, y, *, M_out: int, out_mode: int = OUT_PLAIN, alpha: float = 1.0, extra=None, c=None,
           bias=None, activation: int = 0, residual=None, tiles: Tiles | None = None) -> None:
    """y ← the formula above. x2d (M, N_IN), w3 (NB, T, P) (any strides), y (M, ·) written at its strides;
    extra = (x2 (M, R), w2 (T, R)) for the second loop (NB = 1 only); c, residual (M, M_out) and bias (M_out,)
    are read at the output's columns. The dtype rules (UPCAST, IEEE) follow x2d's dtype."""
    M, n_in = x2d.shape
    nb, T, P = w3.shape
    if M == 0 or T == 0 or nb == 0:
        return
    t = tiles or default_tiles(M, T, P, x2d.dtype)
    if t.tma and nb == 1 and out_mode == OUT_PLAIN and _tma_operands(x2d, w3[0]):
        return _launch_tma(x2d, w3[0], y, T, alpha, extra, c, bias, activation, residual, t)
    x2, w2 = extra if extra is not None else (x2d, w3[0])
    R = x2.shape[1] if extra is not None else 0
    br = min(64, pow2(R)) if extra is not None else 16
    cc = c if c is not None else y
    rr = residual if residual is not None else y
    bb = bias if bias is not None else y
    grid = (nb * cdiv(M, t.BM) * cdiv(T, t.BN),)
    opts = {} if interpreter() else dict(num_warps=t.warps, num_stages=t.stages)
    block_gemm_kernel[grid](
        x2d, w3, x2, w2, cc, bb, rr, y,
        M, n_in, nb, P, T, int(M_out), R, float(alpha),
        x2d.stride(0), x2d.stride(1), w3.stride(0), w3.stride(1), w3.stride(2),
        x2.stride(0), x2.stride(1), w2.stride(0), w2.stride(1),
        cc.stride(0), cc.stride(1), rr.stride(0), rr.stride(1), y.stride(0), y.stride(1),
        OUT=out_mode, HAS_EXTRA=extra is not None, HAS_C=c is not None, HAS_BIAS=bias is not None,
        ACT=int(activation), HAS_RES=residual is not None, UPCAST=mma_upcast(x2d.dtype),
        IEEE=x2d.dtype == torch.float32, BM=t.BM, BN=t.BN, BK=t.BK, BR=br, GROUP_M=t.GROUP_M, **opts)


def _tma_operands(x2d: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA descriptors need fp16/bf16 operands with unit stride along K and 16-byte aligned rows and bases."""
    if x2d.dtype not in (torch.float16, torch.bfloat16) or mma_upcast(x2d.dtype) or w.dtype != x2d.dtype:
        return False
    size = x2d.element_size()
    return (x2d.stride(1) == 1 and w.stride(1) == 1 and (x2d.stride(0) * size) % 16 == 0
            and (w.stride(0) * size) % 16 == 0 and x2d.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
            and (x2d.shape[1] * size) % 16 == 0)


_ALLOCATOR_SET = [False]


def _launch_tma(x2d, w, y, N, alpha, extra, c, bias, activation, residual, t: Tiles) -> None:
    import triton as _triton
    if not _ALLOCATOR_SET[0] and hasattr(_triton, "set_allocator"):
        # device-side descriptors live in a small per-launch scratch buffer Triton asks the allocator for
        _triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET[0] = True
    M, K = x2d.shape
    x2, w2 = extra if extra is not None else (x2d, w)
    R = x2.shape[1] if extra is not None else 0
    cc = c if c is not None else y
    rr = residual if residual is not None else y
    bb = bias if bias is not None else y
    grid = (cdiv(M, t.BM) * cdiv(N, t.BN),)
    tma_gemm_kernel[grid](
        x2d, w, x2, w2, cc, bb, rr, y, M, N, K, R, float(alpha),
        x2d.stride(0), w.stride(0), x2.stride(0), x2.stride(1), w2.stride(0), w2.stride(1),
        cc.stride(0), cc.stride(1), rr.stride(0), rr.stride(1), y.stride(0), y.stride(1),
        HAS_EXTRA=extra is not None, HAS_C=c is not None, HAS_BIAS=bias is not None, ACT=int(activation),
        HAS_RES=residual is not None, WS=t.ws, BM=t.BM, BN=t.BN, BK=t.BK,
        BR=min(64, pow2(R)) if extra is not None else 16, GROUP_M=t.GROUP_M, num_warps=t.warps,
        num_stages=t.stages)


def dense_linear(x2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x·wᵀ by the vendor library (cuBLAS on a GPU): the main GEMM of the hybrid candidates (cuBLAS + one Triton
    pass). One name, so codegen.compile_check can stand in for it while it records launches."""
    import torch.nn.functional as F
    return F.linear(x2d, w)


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an intermediate written by one GEMM and read by the next: the input dtype where the dots take
    it as is (it is rounded there, as the torch reference rounds it), fp32 where they are upcast (fp32 inputs,
    bf16 under the interpreter)."""
    return torch.float32 if mma_upcast(dtype) else dtype
