"""Mixed-adapter LoRA in one kernel: y[i] = x[i]·Wᵀ + b + s_k·(x_a[i]·A_kᵀ)·B_kᵀ, k = the adapter of row i.

The op it lowers is `rewrite::multi_lora_linear` (rewriter/ops/multi_lora_linear.py): named adapters with a per-row
index (Punica's BGMV/SGMV, S-LoRA), or gates (every row the same active adapters — then they are concatenated into
one adapter, Σ g_k·s_k·B_k·A_k = [g₁s₁B₁ …]·[A₁; …], and every row uses it), on a dense base W or on the output of
another layer's kernel (`base`: Monarch, block-diagonal, low-rank, ShiftAdd — QLoRA-style adapters; the kernel then
adds the adapter updates to that output).

Layout (the launch prepares it; n adapters, R = the largest rank, BR = R padded to a power of two ≥ 16):
    A (n, R, K), B (n, N, R) zero-padded stacks, s (n,) fp32 scales,
    slot (M,) the adapter of each row (−1: none), perm (M,) the rows sorted by slot (stable): sorted row j is row
    perm[j] of x and of y — the kernel gathers and scatters through perm, so rows of one adapter are contiguous
    (SGMV's segments) and a tile of BM sorted rows meets few adapters.

One program computes a (BM, BN) tile of sorted rows:
    acc  = x[perm[rows]]·W[cols]ᵀ            (K loop, tl.dot, fp32 accumulator)   — or the base output's tile
    for a in [min slot of the tile, max slot of the tile]:                    (rows without adapter: none)
        h    = x_a[perm[rows of a]]·A[a]ᵀ    (K loop, rows of other adapters masked to 0)   (BM, BR)
        acc += (s[a]·h)·B[a][cols]ᵀ
    + bias, stored to y[perm[rows], cols]
The adapter work per tile is the base work × r/BN per adapter met — one adapter per tile when rows per adapter ≥ BM.

Constexprs: HAS_W (dense base) / HAS_BASE (base output given), HAS_BIAS, HAS_XA (dropout input), UPCAST (dot
operands to fp32: fp32 inputs, bf16 under the interpreter), IEEE (exact fp32 dots), BM/BN/BK/BR.
DoRA adapters run the reference (their per-row norm rescaling is not in the kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen import runtime
from codegen.runtime import mma_upcast, notice_fallback, offsets_reason
from rewriter.ops import multi_lora_linear as multi


@triton.jit
def lora_batch_kernel(x_ptr, xa_ptr, w_ptr, base_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, perm_ptr, slot_ptr, y_ptr,
                      M, N, K, R,
                      sxm, sxk, sam, sak, swn, swk, sbm, sbn, sbias, sAa, sAr, sAk, sBa, sBn, sBr, sym, syn,
                      HAS_W: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_XA: tl.constexpr,
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
    rows = tl.load(perm_ptr + rm, mask=m_ok, other=0)
    slot = tl.load(slot_ptr + rm, mask=m_ok, other=-1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_W:
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < K
            x = tl.load(x_ptr + rows[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            wt = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                wt = wt.to(tl.float32)
            if IEEE:
                acc = tl.dot(x, wt, acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(x, wt, acc, out_dtype=tl.float32)
    if HAS_BASE:
        base = tl.load(base_ptr + rows[:, None] * sbm + rn[None, :] * sbn, mask=m_ok[:, None] & n_ok[None, :],
                       other=0.0)
        acc = acc + base.to(tl.float32)
    lo = tl.min(tl.where(m_ok & (slot >= 0), slot, 2147483647), axis=0)
    hi = tl.max(tl.where(m_ok, slot, -1), axis=0)
    for a in range(lo, hi + 1):
        sel = m_ok & (slot == a)
        h = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < K
            if HAS_XA:
                xa = tl.load(xa_ptr + rows[:, None] * sam + rk[None, :] * sak, mask=sel[:, None] & k_ok[None, :],
                             other=0.0)
            else:
                xa = tl.load(x_ptr + rows[:, None] * sxm + rk[None, :] * sxk, mask=sel[:, None] & k_ok[None, :],
                             other=0.0)
            at = tl.load(a_ptr + a * sAa + rk[:, None] * sAk + rr[None, :] * sAr, mask=k_ok[:, None] & r_ok[None, :],
                         other=0.0)
            if UPCAST:
                xa = xa.to(tl.float32)
                at = at.to(tl.float32)
            if IEEE:
                h = tl.dot(xa, at, h, input_precision="ieee", out_dtype=tl.float32)
            else:
                h = tl.dot(xa, at, h, out_dtype=tl.float32)
        bt = tl.load(b_ptr + a * sBa + rr[:, None] * sBr + rn[None, :] * sBn, mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        h = h * tl.load(s_ptr + a)
        if UPCAST:
            bt = bt.to(tl.float32)
        else:
            h = h.to(b_ptr.dtype.element_ty)   # s·h rounded to the input dtype (one dtype per tl.dot)
        if IEEE:
            acc = tl.dot(h, bt, acc, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc = tl.dot(h, bt, acc, out_dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn * sbias, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(y_ptr + rows[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def rank_block(R: int) -> int:
    """BR: the rank padded to a power of two ≥ 16 (tl.dot needs K ≥ 16 on GPU)."""
    return max(16, triton.next_power_of_2(max(int(R), 1)))


GPU_BLOCKS = dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=3)
INTERPRETER_BLOCKS = dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=1)


def stacks(lora_a: list, lora_b: list, scales: list, dtype, device):
    """(A (n, R, K), B (n, N, R), s (n,) fp32) zero-padded to the largest rank R."""
    n = len(lora_a)
    K = lora_a[0].shape[1] if n else 0
    N = lora_b[0].shape[0] if n else 0
    R = max((a.shape[0] for a in lora_a), default=0)
    a_st = torch.zeros(max(n, 1), max(R, 1), max(K, 1), dtype=dtype, device=device)
    b_st = torch.zeros(max(n, 1), max(N, 1), max(R, 1), dtype=dtype, device=device)
    for k, (a, b) in enumerate(zip(lora_a, lora_b)):
        a_st[k, :a.shape[0], :K] = a
        b_st[k, :N, :b.shape[1]] = b
    return a_st, b_st, torch.tensor(list(scales) or [0.0], dtype=torch.float32, device=device), R


def row_slots(x: torch.Tensor, index, ids: list[int]) -> torch.Tensor:
    """Per flattened row of x, the position of its adapter in the op's list (−1: none)."""
    rows = multi.row_index(x, index)
    slots = torch.full_like(rows, -1)
    for k, id_ in enumerate(ids):
        slots = torch.where(rows == int(id_), k, slots)
    return slots


def launch(x, weight, bias, base, lora_a: list, lora_b: list, scales: list, slots: torch.Tensor | None,
           adapter_input=None, blocks: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel: adapter k (A_k, B_k, scale_k) on the rows whose slot is k (slots None: every row adapter 0).
    `out` (rows, N) receives the result when given (tests pass guarded views)."""
    K = x.shape[-1]
    N = weight.shape[0] if weight is not None else base.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    xa2 = adapter_input.reshape(-1, K) if adapter_input is not None else x2
    base2 = base.reshape(M, N) if base is not None else None
    a_st, b_st, s_t, R = stacks(lora_a, lora_b, scales, x.dtype, x.device)
    if slots is None:
        slots = torch.zeros(M, dtype=torch.int64, device=x.device) if lora_a else \
            torch.full((M,), -1, dtype=torch.int64, device=x.device)
    order = torch.argsort(slots, stable=True)
    perm = order.to(torch.int32)
    sorted_slots = slots[order].to(torch.int32)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    w = weight if weight is not None else y
    bb = base2 if base2 is not None else y
    args = (x2, xa2, w, bb, bias if bias is not None else y, a_st, b_st, s_t, perm, sorted_slots, y,
            M, N, K, R,
            x2.stride(0), x2.stride(1), xa2.stride(0), xa2.stride(1), w.stride(0), w.stride(1),
            bb.stride(0), bb.stride(1), bias.stride(0) if bias is not None else 0,
            a_st.stride(0), a_st.stride(1), a_st.stride(2),
            b_st.stride(0), b_st.stride(1), b_st.stride(2), y.stride(0), y.stride(1))
    flags = dict(HAS_W=weight is not None, HAS_BASE=base is not None, HAS_BIAS=bias is not None,
                 HAS_XA=adapter_input is not None, UPCAST=mma_upcast(x.dtype), IEEE=x.dtype == torch.float32)
    tiles = dict(blocks or (INTERPRETER_BLOCKS if runtime.interpreter() else GPU_BLOCKS))
    tiles.setdefault("BR", rank_block(R))
    if M > 0 and N > 0:
        grid = (triton.cdiv(M, tiles["BM"]), triton.cdiv(N, tiles["BN"]))
        lora_batch_kernel[grid](*args, **flags, **tiles)
    return y.reshape(*x.shape[:-1], N) if out is None else out


def supported(x, weight, bias, base, lora_a, lora_b, dora, adapter_input) -> str | None:
    """None when the kernel handles these inputs, else the reason it does not."""
    dt = x.dtype
    if dt not in runtime.KERNEL_DTYPES:
        return f"dtype {dt} has no kernel"
    for t in [weight, bias, base, adapter_input, *lora_a, *lora_b]:
        if t is not None and t.dtype != dt:
            return "mixed dtypes"
    if any(d >= 0 for d in dora):
        return "DoRA adapters (norm rescaling) run the reference"
    if max((a.shape[0] for a in lora_a), default=0) > 128:
        return "rank > 128"
    return None


def run(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index=None,
        adapter_input=None):
    """rewrite::multi_lora_linear's semantics through the kernel where it applies, else the reference."""
    reference = lambda: multi.compute(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales,  # noqa: E731
                                      gates, ids, dora, index, adapter_input)
    from codegen import ops as kops   # its can_launch (compile_check records launches by replacing it)
    tensors = [x, weight, bias, base, adapter_input, *lora_a, *lora_b]
    n_out = weight.shape[0] if weight is not None else base.shape[-1]
    reason = supported(x, weight, bias, base, lora_a, lora_b, dora, adapter_input) or \
        offsets_reason(*tensors, out_numel=x.numel() // max(x.shape[-1], 1) * n_out)
    if reason is not None or not kops.can_launch(*tensors):
        notice_fallback("rewrite_triton.multi_lora_linear", reason or "no device for Triton kernels")
        with torch.no_grad():
            return reference()
    if multi.row_index(x, index) is not None:
        return launch(x, weight, bias, base, list(lora_a), list(lora_b), [float(s) for s in scales],
                      row_slots(x, index, ids), adapter_input)
    active = [k for k, g in enumerate(gates) if float(g) != 0.0]
    if not active:
        return launch(x, weight, bias, base, [], [], [], None, adapter_input)
    cat_a = torch.cat([lora_a[k] for k in active])
    cat_b = torch.cat([lora_b[k] * (float(gates[k]) * float(scales[k])) for k in active], dim=1)
    return launch(x, weight, bias, base, [cat_a], [cat_b], [1.0], None, adapter_input)


@torch.library.custom_op("rewrite_triton::multi_lora_linear", mutates_args=())
def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      base: torch.Tensor | None, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                      magnitudes: list[torch.Tensor], names: str, scales: list[float], gates: list[float],
                      ids: list[int], dora: list[int], index: torch.Tensor | None = None,
                      adapter_input: torch.Tensor | None = None) -> torch.Tensor:
    return run(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index,
               adapter_input).contiguous()


@multi_lora_linear.register_fake
def _(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index=None,
      adapter_input=None):
    n_out = weight.shape[0] if weight is not None else base.shape[-1]
    return x.new_empty(*x.shape[:-1], n_out)


# gradients: the rewrite:: op's own (recompute the reference for the tensors that need one; same schema)
multi_lora_linear.register_autograd(multi._backward, setup_context=multi._setup_context)

OP = torch.ops.rewrite_triton.multi_lora_linear.default


def reference(*args, **kwargs):
    """The lowered op's reference: the rewrite:: op's (what the kernel must agree with)."""
    return multi.compute(*args, **kwargs)
