"""Two-pass softmax (Dukhan & Ablavatski): softmax without a max pass and without overflow.

    eˣ = p·2ⁿ,  n = round(x·log₂e),  p = exp(x − n·ln2)
             (ln2 = hi + lo, Cody–Waite: n·hi is exact, so p keeps fp32 accuracy even for |x| ~ 1000)
    pass 1:  (S_m, S_e) from (0, −∞):
             e′ = max(S_e, n);  S_m ← S_m·2^(S_e−e′) + p·2^(n−e′);  S_e ← e′
    pass 2:  yᵢ = pᵢ / S_m · 2^(nᵢ − S_e)

Vectorised, a chunk of the row folds in at once: e_c = max nᵢ over the chunk, S_c = Σ pᵢ·2^(nᵢ−e_c), then one
(S_m, S_e) update with (S_c, e_c). Two kernels: `softmax_row_kernel` keeps a whole row in one block (reads x once,
writes once); `softmax_looped_kernel` walks rows longer than a block in chunks (reads x twice, writes once).
x = −∞ gives p = 0 (masked lanes load −∞). One program per row; loads are upcast to fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen.runtime import interpreter

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
def softmax_row_kernel(x_ptr, y_ptr, N, sxr, sxc, syr, syc, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * sxr + cols * sxc, mask=mask, other=float("-inf")).to(tl.float32)
    p, n = _mantissa_exponent(x)
    s_e = tl.max(n, axis=0)
    s_m = tl.sum(p * tl.exp2(n - s_e), axis=0)
    y = p / s_m * tl.exp2(n - s_e)
    tl.store(y_ptr + row * syr + cols * syc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_looped_kernel(x_ptr, y_ptr, N, sxr, sxc, syr, syc, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    s_m = tl.sum(tl.zeros((BLOCK,), dtype=tl.float32), axis=0)
    s_e = s_m + float("-inf")
    for c0 in range(0, N, BLOCK):
        c = c0 + cols
        x = tl.load(x_ptr + row * sxr + c * sxc, mask=c < N, other=float("-inf")).to(tl.float32)
        p, n = _mantissa_exponent(x)
        e_c = tl.max(n, axis=0)
        # an all −∞ chunk has e_c = −∞: measure against 0 instead so 2^(−∞ − e) stays 0, never NaN
        s_c = tl.sum(p * tl.exp2(n - _finite_or_zero(e_c)), axis=0)
        e_new = tl.maximum(s_e, e_c)
        e_ref = _finite_or_zero(e_new)
        s_m = s_m * tl.exp2(s_e - e_ref) + s_c * tl.exp2(e_c - e_ref)
        s_e = e_new
    for c0 in range(0, N, BLOCK):
        c = c0 + cols
        mask = c < N
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


def launch(x: torch.Tensor, dim: int, block: int | None = None, looped: bool | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(x, dim). `block`/`looped` override the choice (tests use them to force the looped kernel);
    `out` (x's shape, any strides) receives the result."""
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
        if block is None:
            block = min(triton.next_power_of_2(N), max_row_block()) if looped else triton.next_power_of_2(N)
        kernel = softmax_looped_kernel if looped else softmax_row_kernel
        extra = {} if interpreter() else {"num_warps": 4 if block <= 1024 else 8 if block <= 4096 else 16}
        kernel[(rows,)](x2, y2, N, x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1), BLOCK=block, **extra)
    if out is None:
        return y2.reshape(xm.shape).movedim(-1, dim)
    if copy_back:
        om.copy_(y2.view(om.shape))
    return out


def reference(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(x, dim)
