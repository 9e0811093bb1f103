"""ShiftAdd (BCQ) LUT GEMV for rewrite::shiftadd_linear (layout and math: rewriter/bcq.py).

    signs      uint8 (q, out, in_pad/8): bit u of byte k of plane i is the sign of column 8k+u
    exponents  int8  (out, G, q, terms), or broadcastable to it: the plane scale of (row, group, plane) is
               Σₜ 2^e, e = −128 meaning 0 (the affine code stores (1, 1, q, 1): plane i is 2^{i−1} everywhere)
    scales s, offsets β: None (the pow2 code: s = 1, β = 0) or float (out, G) (the affine code)
    y[r] = Σ_j ( s[r, j] · Σ_i Σ_t 2^e[r, j, i, t] · Σ_{bytes k of group j} lut[k, signs[i, r, k]]
                 + β[r, j] · Σ_{c in group j} x[c] ) (+ b[r])
    lut[k, idx] = Σ_u (2·bit_u(idx) − 1)·x[8k + u]            (256 signed partial sums per 8 activations)

`lut_gemv_kernel`, grid (output blocks of BO, K splits, rows): a program takes BO outputs of one row over a
contiguous range of groups (split-K: for one row of 4096 → 4096 at BO = 128 there are only 32 output blocks,
so the groups are split until the grid has ~256 programs: ~2 per SM). Per group it builds the group's tables —
(256 entries × bytes-per-group) fp32, in registers: 8 selects and adds per entry, x's padding a load mask — and
for each bit plane loads the (BO, bytes) tile of sign bytes once and looks every byte up in its table
(tl.gather along the entry axis: no multiply, no dequantised weight); the row sums are the group's partial
sums, scaled by exp2 of the int8 exponents (exact powers of two) and accumulated in fp32. The affine code
(constexprs HAS_SCALES / HAS_OFFSETS; both off for pow2, whose code is then unchanged) sums a group's planes
into a per-group accumulator first, multiplies it by s[r, j] and adds β[r, j]·Σx over the group (the group's
input sum is accumulated while its tables are built, padding masked): one multiply-add per (row, output, group)
each. Broadcast exponents are read through the expanded view's strides (0 on the broadcast dims). Each sign
byte is read once per row; nothing but the output (or the split partials) is written. With several splits the
fp32 partials (splits, rows, out) are summed by `lut_reduce_kernel`, which adds the bias and casts to x's dtype.

The kernel is for decoding-sized inputs (ShiftAddLLM's setting): every row re-reads the signs. Past LUT_ROWS_MAX
rows rewrite_triton's op dequantises and runs one dense GEMM (`lut_pays_off`), by design rather than as a
fallback; below it codegen.select times the LUT candidates (output block 128 or 64, split-K on or off) against
that dequantise + GEMM aten path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen.runtime import cdiv, interpreter, next_pow2
from codegen.select import Candidate
from rewriter import bcq

ZERO_EXP = -128
LUT_ROWS_MAX = 16
TARGET_PROGRAMS = 256


def lut_pays_off(rows: int, signs: torch.Tensor) -> bool:
    """True for GEMV-sized inputs (≤ LUT_ROWS_MAX rows); more rows: dequantise + one GEMM."""
    return rows <= LUT_ROWS_MAX


@triton.jit
def lut_gemv_kernel(x_ptr, s_ptr, e_ptr, b_ptr, sc_ptr, of_ptr, y_ptr, part_ptr,
                    M, N_IN, OUT, GROUPS, GROUPS_PER_SPLIT, BYTES_PER_GROUP, PLANES, TERMS,
                    sxm, sxk, ssi, sso, ssk, seo, seg, sei, set, sco, scg, soo, sog, sym, syn,
                    HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                    SPLIT: tl.constexpr, BO: tl.constexpr, BKB: tl.constexpr):
    ro = tl.program_id(0) * BO + tl.arange(0, BO)
    sp = tl.program_id(1)
    row = tl.program_id(2)
    o_ok = ro < OUT
    kk = tl.arange(0, BKB)
    kk_ok = kk < BYTES_PER_GROUP
    entry = tl.arange(0, 256)
    acc = tl.zeros((BO,), dtype=tl.float32)
    g_lo = sp * GROUPS_PER_SPLIT
    g_hi = tl.minimum(g_lo + GROUPS_PER_SPLIT, GROUPS)
    for j in range(g_lo, g_hi):
        kb = j * BYTES_PER_GROUP + kk
        table = tl.zeros((256, BKB), dtype=tl.float32)       # table[e, k] = Σ_u ±x[8k + u] (sign = bit u of e)
        xs = tl.zeros((BKB,), dtype=tl.float32)              # Σ_u x[8k + u]: the group's input sum, for β
        for u in tl.static_range(8):
            col = kb * 8 + u
            xu = tl.load(x_ptr + row * sxm + col * sxk, mask=kk_ok & (col < N_IN), other=0.0).to(tl.float32)
            bit = (entry >> u) & 1
            table += tl.where(bit[:, None] == 1, xu[None, :], -xu[None, :])
            if HAS_OFFSETS:
                xs += xu
        # the affine code sums the group's planes apart (then × s, + β·Σx); pow2 adds them straight into acc
        if HAS_SCALES or HAS_OFFSETS:
            gacc = tl.zeros((BO,), dtype=tl.float32)
        else:
            gacc = acc
        tile_ok = o_ok[:, None] & kk_ok[None, :]
        for i in range(0, PLANES):
            idx = tl.load(s_ptr + i * ssi + ro[:, None] * sso + kb[None, :] * ssk, mask=tile_ok, other=0)
            vals = tl.gather(table, idx.to(tl.int32), axis=0)            # table[idx[o, k], k]
            part = tl.sum(tl.where(tile_ok, vals, 0.0), axis=1)        # (BO,) the group's partial sums
            for t in range(0, TERMS):
                e = tl.load(e_ptr + ro * seo + j * seg + i * sei + t * set, mask=o_ok, other=-128).to(tl.int32)
                gacc += part * tl.where(e == -128, 0.0, tl.exp2(e.to(tl.float32)))
        if HAS_SCALES:
            gacc *= tl.load(sc_ptr + ro * sco + j * scg, mask=o_ok, other=0.0).to(tl.float32)
        if HAS_OFFSETS:
            gacc += tl.load(of_ptr + ro * soo + j * sog, mask=o_ok, other=0.0).to(tl.float32) * tl.sum(xs, axis=0)
        if HAS_SCALES or HAS_OFFSETS:
            acc += gacc
        else:
            acc = gacc
    if SPLIT:
        tl.store(part_ptr + (sp * M + row) * OUT + ro, acc, mask=o_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + ro, mask=o_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * sym + ro * syn, acc.to(y_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def lut_reduce_kernel(part_ptr, b_ptr, y_ptr, M, OUT, SPLITS, sym, syn, HAS_BIAS: tl.constexpr, BO: tl.constexpr):
    ro = tl.program_id(0) * BO + tl.arange(0, BO)
    row = tl.program_id(1)
    o_ok = ro < OUT
    acc = tl.zeros((BO,), dtype=tl.float32)
    for sp in range(0, SPLITS):
        acc += tl.load(part_ptr + (sp * M + row) * OUT + ro, mask=o_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ro, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sym + ro * syn, acc.to(y_ptr.dtype.element_ty), mask=o_ok)


def pick_blocks(rows: int, out_features: int, groups: int, bytes_per_group: int, bo: int | None = None,
                split: bool = True) -> dict:
    """BO outputs per program, BKB = bytes per group (a power of two), and the groups per split (all of them when
    not splitting): enough splits that rows × output blocks × splits reaches TARGET_PROGRAMS."""
    bo = bo or (32 if interpreter() else 128)
    bo = min(bo, max(16, next_pow2(out_features)))
    blocks = cdiv(out_features, bo) * max(rows, 1)
    target = 4 if interpreter() else TARGET_PROGRAMS
    splits = max(1, min(groups, cdiv(target, blocks))) if split else 1
    return dict(BO=bo, BKB=max(1, next_pow2(bytes_per_group)),
                groups_per_split=cdiv(groups, splits))


SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def groups_of(signs: torch.Tensor, group: int) -> int:
    """G = in_pad / group, from the packed signs (exponents may be broadcast: their shape does not say)."""
    return signs.shape[2] * 8 // group


def supported(x, signs, exponents, bias, in_features, group, scales=None, offsets=None) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} has no kernel"
    if signs.dtype != torch.uint8 or exponents.dtype != torch.int8:
        return "signs must be uint8 and exponents int8"
    if group <= 0 or group % 8 or signs.shape[2] * 8 % group:
        return "group does not match the packed layout"
    q, out_f, nbytes = signs.shape
    groups = groups_of(signs, group)
    if exponents.dim() != 4 or any(n not in (1, m) for n, m in zip(exponents.shape[:3], (out_f, groups, q))):
        return f"exponents {tuple(exponents.shape)} do not broadcast to ({out_f}, {groups}, {q}, terms)"
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is not None and (t.dtype not in SCALE_DTYPES or tuple(t.shape) != (out_f, groups)):
            return f"{name} must be a float ({out_f}, {groups}) tensor, got {t.dtype} {tuple(t.shape)}"
    return None


def launch(x, signs, exponents, bias, in_features: int, group: int, scales=None, offsets=None,
           blocks: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ b) through the tables; `out` (rows, out), any strides, gets the result. `exponents` may be
    broadcastable to (out, G, q, terms); `scales` / `offsets` (out, G) or None (see the module docstring)."""
    q, out_f, nbytes = signs.shape
    groups = groups_of(signs, group)
    exps = bcq.full_exponents(signs, exponents, group)       # a view: stride 0 on the broadcast dims
    terms = exps.shape[3]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    y = torch.empty(rows, out_f, dtype=x.dtype, device=x.device) if out is None else out
    b = blocks or pick_blocks(rows, out_f, groups, group // 8)
    if rows and out_f:
        splits = cdiv(groups, b["groups_per_split"])
        part = torch.empty(splits, rows, out_f, dtype=torch.float32, device=x.device) if splits > 1 else y
        sc = scales if scales is not None else y          # (a dummy pointer when absent: never read)
        of = offsets if offsets is not None else y
        lut_gemv_kernel[(cdiv(out_f, b["BO"]), splits, rows)](
            x2, signs, exps, bias if bias is not None else y, sc, of, y, part,
            rows, int(in_features), out_f, groups, b["groups_per_split"], group // 8, q, terms,
            x2.stride(0), x2.stride(1), signs.stride(0), signs.stride(1), signs.stride(2),
            exps.stride(0), exps.stride(1), exps.stride(2), exps.stride(3),
            sc.stride(0) if scales is not None else 0, sc.stride(1) if scales is not None else 0,
            of.stride(0) if offsets is not None else 0, of.stride(1) if offsets is not None else 0,
            y.stride(0), y.stride(1), HAS_BIAS=bias is not None, HAS_SCALES=scales is not None,
            HAS_OFFSETS=offsets is not None, SPLIT=splits > 1, BO=b["BO"], BKB=b["BKB"])
        if splits > 1:
            lut_reduce_kernel[(cdiv(out_f, b["BO"]), rows)](
                part, bias if bias is not None else y, y, rows, out_f, splits, y.stride(0), y.stride(1),
                HAS_BIAS=bias is not None, BO=b["BO"])
    return y.reshape(*x.shape[:-1], out_f) if out is None else out


def reference(x, signs, exponents, bias, in_features, group, scales=None, offsets=None):
    from rewriter.ops import shiftadd_linear as op
    return op.reference(x, signs, exponents, bias, in_features, group, scales, offsets)


def candidates(x, signs, exponents, bias, in_features, group, scales=None, offsets=None):
    args = (x, signs, exponents, bias, in_features, group, scales, offsets)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out_f, groups = signs.shape[1], groups_of(signs, group)
    configs = [(None, True)] if interpreter() else [(128, True), (64, True), (128, False)]
    out = []
    for bo, split in configs:
        b = pick_blocks(rows, out_f, groups, group // 8, bo, split)
        name = f"triton[lut BO{b['BO']} splits{cdiv(groups, b['groups_per_split'])}]"
        if all(c.name != name for c in out):
            out.append(Candidate(name, "triton", lambda b=b: launch(*args, blocks=b)))
    out.append(Candidate("aten", "aten", lambda: reference(*args)))
    return out
