"""Two-pass softmax (Dukhan & Ablavatski): softmax without a max pass and without overflow.

    eˣ = p·2ⁿ,  n = round(x·log₂e),  p = exp(x − n·ln2)
             (ln2 = hi + lo, Cody–Waite: n·hi is exact, so p keeps fp32 accuracy even for |x| ~ 1000)
    pass 1:  (S_m, S_e) from (0, −∞):
             e′ = max(S_e, n);  S_m ← S_m·2^(S_e−e′) + p·2^(n−e′);  S_e ← e′
    pass 2:  yᵢ = pᵢ / S_m · 2^(nᵢ − S_e)

Vectorised, a chunk of the row folds in at once: e_c = max nᵢ over the chunk, S_c = Σ pᵢ·2^(nᵢ−e_c), then one
(S_m, S_e) update with (S_c, e_c); two partial sums combine the same way. x = −∞ gives p = 0 (masked lanes load
−∞). Loads are upcast to fp32.

Kernels (the goal on a GPU: move bytes at copy speed — one read per pass, one write):
    softmax_row_kernel        rows ≤ max_row_block(): BLOCK_R whole rows per program (x read once, y written
                              once); several short rows per program so each moves ≥ 4096 elements
    softmax_partial_kernel    long rows, pass 1: grid (rows, chunks) — each program folds one chunk of one row
                              into a partial (S_m, S_e); chunks are chosen so rows × chunks fills the GPU even
                              for a few 131k-long rows (one program per row left most SMs idle)
    softmax_normalize_kernel  pass 2, same grid: each program combines its row's partials (≤ 1024 of them) and
                              writes yᵢ for its chunk (x read a second time)
Candidates for codegen.select: the kernels above (for long rows also with half as many chunks) and torch.softmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen.runtime import cdiv, interpreter, next_pow2
from codegen.select import Candidate

LOG2E = 1.4426950408889634
LN2_HI = 0.693359375               # 9 significant bits: n·LN2_HI is exact in fp32 for |n| < 2^15
LN2_LO = -2.1219444005471377e-04   # ln 2 − LN2_HI


@triton.jit
def _mantissa_exponent(x):
    finite = x > float("-inf")
    xs = tl.where(finite, x, 0.0)       # keep −∞ out of the arithmetic (−∞ − −∞ would be NaN)
    n = tl.floor(xs * 1.4426950408889634 + 0.5)
    p = tl.exp((xs - n * 0.693359375) - n * -2.1219444005471377e-04)
    n = tl.where(finite, n, float("-inf"))
    p = tl.where(finite, p, 0.0)
    return p, n


@triton.jit
def _finite_or_zero(e):
    return tl.where(e == float("-inf"), 0.0, e)


@triton.jit
def softmax_row_kernel(x_ptr, y_ptr, R, N, sxr, sxc, syr, syc, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxc, mask=mask, other=float("-inf")).to(tl.float32)
    p, n = _mantissa_exponent(x)
    s_e = tl.max(n, axis=1)
    scale = tl.exp2(n - s_e[:, None])
    s_m = tl.sum(p * scale, axis=1)
    y = p / s_m[:, None] * scale
    tl.store(y_ptr + rows[:, None] * syr + cols[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_partial_kernel(x_ptr, pm_ptr, pe_ptr, N, CHUNK, sxr, sxc, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    ch = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    s_m = tl.sum(tl.zeros((BLOCK,), dtype=tl.float32), axis=0)
    s_e = s_m + float("-inf")
    lo = ch * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    for c0 in range(lo, hi, BLOCK):
        c = c0 + cols
        x = tl.load(x_ptr + row * sxr + c * sxc, mask=c < hi, other=float("-inf")).to(tl.float32)
        p, n = _mantissa_exponent(x)
        e_c = tl.max(n, axis=0)
        # an all −∞ chunk has e_c = −∞: measure against 0 instead so 2^(−∞ − e) stays 0, never NaN
        s_c = tl.sum(p * tl.exp2(n - _finite_or_zero(e_c)), axis=0)
        e_new = tl.maximum(s_e, e_c)
        e_ref = _finite_or_zero(e_new)
        s_m = s_m * tl.exp2(s_e - e_ref) + s_c * tl.exp2(e_c - e_ref)
        s_e = e_new
    chunks = tl.num_programs(1)
    tl.store(pm_ptr + row * chunks + ch, s_m)
    tl.store(pe_ptr + row * chunks + ch, s_e)


@triton.jit
def softmax_normalize_kernel(x_ptr, y_ptr, pm_ptr, pe_ptr, N, CHUNK, sxr, sxc, syr, syc, BLOCK: tl.constexpr,
                             BLOCK_CH: tl.constexpr):
    row = tl.program_id(0)
    ch = tl.program_id(1)
    chunks = tl.num_programs(1)
    rc = tl.arange(0, BLOCK_CH)
    pm = tl.load(pm_ptr + row * chunks + rc, mask=rc < chunks, other=0.0)
    pe = tl.load(pe_ptr + row * chunks + rc, mask=rc < chunks, other=float("-inf"))
    s_e = tl.max(pe, axis=0)
    s_m = tl.sum(pm * tl.exp2(pe - _finite_or_zero(s_e)), axis=0)
    cols = tl.arange(0, BLOCK)
    lo = ch * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    for c0 in range(lo, hi, BLOCK):
        c = c0 + cols
        mask = c < hi
        x = tl.load(x_ptr + row * sxr + c * sxc, mask=mask, other=float("-inf")).to(tl.float32)
        p, n = _mantissa_exponent(x)
        y = p / s_m * tl.exp2(n - s_e)
        tl.store(y_ptr + row * syr + c * syc, y.to(y_ptr.dtype.element_ty), mask=mask)


def max_row_block() -> int:
    return 128 if interpreter() else 8192


def supported(x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} has no kernel"
    return None


TARGET_PROGRAMS = 1024      # long rows: split each into chunks until rows × chunks reaches this (~8 per SM)


def split(rows: int, n: int, block: int, target: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(chunks per row, chunk length — a multiple of block) for the two-kernel path."""
    blocks = cdiv(n, block)
    chunks = max(1, min(blocks, 1024, cdiv(target, max(rows, 1))))
    length = cdiv(blocks, chunks) * block
    return cdiv(n, length), length


def _warps(block: int) -> dict:
    return {} if interpreter() else {"num_warps": 4 if block <= 1024 else 8 if block <= 4096 else 16}


def launch(x: torch.Tensor, dim: int, block: int | None = None, looped: bool | None = None,
           out: torch.Tensor | None = None, target_programs: int = TARGET_PROGRAMS) -> torch.Tensor:
    """softmax(x, dim). `block`/`looped` override the choice (tests use them to force the two-kernel path with
    small chunks); `out` (x's shape, any strides) receives the result."""
    if x.dim() == 0:
        return torch.ones_like(x)
    dim = dim % x.dim()
    xm = x.movedim(dim, -1)
    N = xm.shape[-1]
    x2 = xm.reshape(-1, N)
    rows = x2.shape[0]
    om = out.movedim(dim, -1) if out is not None else None
    copy_back = False
    try:
        y2 = om.view(rows, N) if om is not None else torch.empty(rows, N, dtype=x.dtype, device=x.device)
    except RuntimeError:            # `out`'s rows are not one 2-D view: compute into a buffer, copy at the end
        y2, copy_back = torch.empty(rows, N, dtype=x.dtype, device=x.device), True
    if rows and N:
        if looped is None:
            looped = N > max_row_block()
        if not looped:
            block = block or next_pow2(N)
            block_r = 1 if interpreter() else max(1, min(16, 4096 // block))
            softmax_row_kernel[(cdiv(rows, block_r),)](
                x2, y2, rows, N, x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1), BLOCK_R=block_r,
                BLOCK=block, **_warps(block * block_r))
        else:
            block = block or min(next_pow2(N), max_row_block() // 2)
            chunks, length = split(rows, N, block, 4 if interpreter() and target_programs == TARGET_PROGRAMS
                                   else target_programs)
            pm = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
            pe = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
            softmax_partial_kernel[(rows, chunks)](x2, pm, pe, N, length, x2.stride(0), x2.stride(1), BLOCK=block,
                                                   **_warps(block))
            softmax_normalize_kernel[(rows, chunks)](x2, y2, pm, pe, N, length, x2.stride(0), x2.stride(1),
                                                     y2.stride(0), y2.stride(1), BLOCK=block,
                                                     BLOCK_CH=max(16, next_pow2(chunks)),
                                                     **_warps(block))
    if out is None:
        return y2.reshape(xm.shape).movedim(-1, dim)
    if copy_back:
        om.copy_(y2.view(om.shape))
    return out


def reference(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(x, dim)


def candidates(x: torch.Tensor, dim: int):
    out = [Candidate("triton[two-pass]", "triton", lambda: launch(x, dim))]
    n = x.shape[dim] if x.dim() else 1
    if n > max_row_block() and not interpreter():
        out.append(Candidate("triton[two-pass, half the chunks]", "triton",
                             lambda: launch(x, dim, target_programs=TARGET_PROGRAMS // 2)))
    out.append(Candidate("aten", "aten", lambda: reference(x, dim)))
    return out
