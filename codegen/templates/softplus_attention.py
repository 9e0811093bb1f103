"""Flash-style LSSA / LSSAR attention for rewrite::softplus_attention (math: rewriter/ops/softplus_attention.py).

    aᵢⱼ = softplus(gₕ · log d · log Nᵢ · q̂ᵢ·k̂ⱼ + bₕ)·keepᵢⱼ,   out = Σⱼ aᵢⱼ vⱼ / (Σⱼ aᵢⱼ + eps)

(the per-head gain g and bias b are optional: one scalar load each per program, g = 1 and b = 0 without them).

The structure of a flash-attention forward: the weights are never materialised; one program owns BM = 128
query rows of one (batch, head) (64 in the second candidate) and walks the keys in BN blocks (K/V loads
pipelined over 3 stages), recomputing q̂·k̂ᵀ with tl.dot (rows normalised in registers, F.normalize's
max(‖x‖, eps)). Causal: a tile stops at the key block holding its last row (the upper triangle is never
computed: half the work of a dense sweep), the blocks wholly below the diagonal run without any mask arithmetic,
only the diagonal blocks (and the key tail) are masked; programs start with the longest rows so the launch's
tail is short.
softplus needs no running max (|q̂·k̂| ≤ 1 bounds the scores: |z| ≤ |g|·log d·log Nᵢ + |b|), so LSSA is one sweep
accumulating Σa·v and Σa.
Nᵢ is min(i+1, Tk) (causal), Tk, or — with a mask — counted in a first sweep over the mask row.
LSSAR (reweight) adds a sweep: sweep A gets Sᵢ = Σa and maxⱼ aᵢⱼ (max r = ReLU(max a/(S+eps)·N − O) since the
map is monotone), sweep B accumulates Σa·v, Σr and Σr·v with r = (ReLU(a/(S+eps)·N − O)/(max r + eps))^p
(exp2(p·log2 r)); the row takes Σr·v/(Σr + eps) where Σr > 0 (and Nᵢ > train_len when set), else Σa·v/(S + eps).
No libdevice: softplus(x) = max(x, 0) + log1p(e^(−|x|)) with log1p(e) ≈ e − e²/2 for e < 1e-4. BN, BD ≥ 16
(tl.dot K ≥ 16 on GPU).

Precision (UPCAST = codegen.runtime.mma_upcast(dtype)): fp32 inputs are dotted as fp32 (IEEE), bf16 under the
interpreter is upcast to fp32. fp16 (and bf16 on a GPU) q, k, v go to tl.dot as loaded — tensor-core MMA, fp32
accumulation. The scores are q·kᵀ of the raw rows times 1/max(‖q‖, eps)·1/max(‖k‖, eps) (= q̂·k̂ᵀ; norms in
fp32), so no normalised row is ever rounded. The one rounded intermediate is the weights fed to ·V: a (and r for
LSSAR), cast to the input dtype before the dot, as flash attention does with P. The reference computes everything
in fp32 (its a is never rounded): a weight's relative error ≤ 2⁻¹¹ shifts out = Σ a·v / Σ a by ≤ 2⁻¹¹·max|v|.
Row sums Σa, Σr, maxima, softplus, re-weighting and the final division use the unrounded fp32 values.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from codegen.runtime import cdiv, interpreter, mma_upcast, next_pow2
from codegen.select import Candidate


@triton.jit
def _softplus(x):
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _keep(mask_ptr, moff, rm, rn, TQ, TK, smq, smk, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    keep = (rm[:, None] < TQ) & (rn[None, :] < TK)
    if CAUSAL:
        keep = keep & (rn[None, :] <= rm[:, None])
    if HAS_MASK:
        mk = tl.load(mask_ptr + moff + rm[:, None] * smq + rn[None, :] * smk, mask=keep, other=0)
        keep = keep & (mk != 0)
    return keep


@triton.jit
def _scores(q, rq, k_ptr, koff, rn, TK, D, skn, skd, eps, UPCAST: tl.constexpr, IEEE: tl.constexpr,
            BD: tl.constexpr):
    """q̂·k̂ᵀ for a (BM, BN) tile: the raw q·kᵀ (input-dtype operands unless UPCAST) scaled by the fp32
    reciprocal norms rq (BM,) and those of the keys."""
    rd = tl.arange(0, BD)
    kt = tl.load(k_ptr + koff + rn[None, :] * skn + rd[:, None] * skd, mask=(rn[None, :] < TK) & (rd[:, None] < D),
                 other=0.0)                                                  # (BD, BN)
    kf = kt.to(tl.float32)
    rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=0)), eps)
    if UPCAST:
        kt = kf
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=tl.float32)
    else:
        s = tl.dot(q, kt, out_dtype=tl.float32)
    return s * rq[:, None] * rk[None, :]


@triton.jit
def _weights(q, rq, scale, bias, k_ptr, koff, m_ptr, moff, rm, rn, TQ, TK, D, skt, skd, smq, smk, eps,
             HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
             IEEE: tl.constexpr, BD: tl.constexpr):
    """The LSSA weights of a (BM, BN) tile; MASKED = False for tiles wholly inside the causal triangle and the
    key range (no mask arithmetic at all)."""
    s = _scores(q, rq, k_ptr, koff, rn, TK, D, skt, skd, eps, UPCAST, IEEE, BD)
    a = _softplus(scale[:, None] * s + bias)
    if MASKED:
        a = tl.where(_keep(m_ptr, moff, rm, rn, TQ, TK, smq, smk, HAS_MASK, CAUSAL), a, 0.0)
    return a


@triton.jit
def _accumulate(acc, a, v_ptr, voff, rn, re, TK, DV, svt, svd, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a·v for one key block: a rounded to the input dtype for the dot (as flash attention does with P)."""
    v = tl.load(v_ptr + voff + rn[:, None] * svt + re[None, :] * svd, mask=(rn < TK)[:, None] & (re < DV)[None, :],
                other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
        ad = a
    else:
        ad = a.to(v_ptr.dtype.element_ty)
    if IEEE:
        return tl.dot(ad, v, acc, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(ad, v, acc, out_dtype=tl.float32)


@triton.jit
def softplus_attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, g_ptr, b_ptr,
                              H, NG, NB, TQ, TK, D, DV, log_d, p, train_len, eps,
                              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                              smb, smh, smq, smk, sob, soh, sot, sod,
                              HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr,
                              HAS_GAIN: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              BD: tl.constexpr, BDV: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:                      # the longest rows (most key blocks) first: the tail of the launch is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    re = tl.arange(0, BDV)
    m_ok = rm < TQ
    qoff = b * sqb + h * sqh
    koff = b * skb + h * skh
    voff = b * svb + h * svh
    moff = b * smb + h * smh
    q = tl.load(q_ptr + qoff + rm[:, None] * sqt + rd[None, :] * sqd, mask=m_ok[:, None] & (rd < D)[None, :],
                other=0.0)
    qf = q.to(tl.float32)
    rq = 1.0 / tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), eps)
    if UPCAST:
        q = qf
    # key blocks: [0, full) need no mask (every key < TK and, causal, ≤ the tile's first row); [full, hi) do;
    # causal tiles stop at their last row (block skipping: the upper triangle is never computed)
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BM)
    full = (TK // BN) * BN
    if CAUSAL:
        full = tl.minimum(full, ((pid_m * BM + 1) // BN) * BN)
    if HAS_MASK:
        full = 0
        n = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, hi, BN):
            rn = n0 + tl.arange(0, BN)
            keep = _keep(m_ptr, moff, rm, rn, TQ, TK, smq, smk, HAS_MASK, CAUSAL)
            n += tl.sum(keep.to(tl.float32), axis=1)
    elif CAUSAL:
        n = tl.minimum(rm + 1, TK).to(tl.float32)
    else:
        n = tl.zeros((BM,), dtype=tl.float32) + TK
    scale = log_d * tl.log(tl.maximum(n, 1.0))
    if HAS_GAIN:                    # NG = H (one per head) or 1 (shared)
        scale = scale * tl.load(g_ptr + h % NG).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + h % NB).to(tl.float32)
    total = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BDV), dtype=tl.float32)
    if REWEIGHT:   # sweep A: row sums and row maxima of the LSSA weights; sweep B below
        a_max = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, hi, BN):
            rn = n0 + tl.arange(0, BN)
            a = _weights(q, rq, scale, bias, k_ptr, koff, m_ptr, moff, rm, rn, TQ, TK, D, skt, skd, smq, smk, eps,
                         HAS_MASK, CAUSAL, True, UPCAST, IEEE, BD)
            total += tl.sum(a, axis=1)
            a_max = tl.maximum(a_max, tl.max(a, axis=1))
        offset = tl.where(n > 1.0, 1.0, 0.0)
        r_max = tl.maximum(a_max / (total + eps) * n - offset, 0.0)
        r_sum = tl.zeros((BM,), dtype=tl.float32)
        acc_r = tl.zeros((BM, BDV), dtype=tl.float32)
        for n0 in range(0, hi, BN):
            rn = n0 + tl.arange(0, BN)
            a = _weights(q, rq, scale, bias, k_ptr, koff, m_ptr, moff, rm, rn, TQ, TK, D, skt, skd, smq, smk, eps,
                         HAS_MASK, CAUSAL, True, UPCAST, IEEE, BD)
            acc = _accumulate(acc, a, v_ptr, voff, rn, re, TK, DV, svt, svd, UPCAST, IEEE)
            r = tl.maximum(a / (total + eps)[:, None] * n[:, None] - offset[:, None], 0.0)
            r = r / (r_max + eps)[:, None]
            r = tl.where(r > 0.0, tl.exp2(p * tl.log2(tl.maximum(r, 1e-30))), 0.0)
            r_sum += tl.sum(r, axis=1)
            acc_r = _accumulate(acc_r, r, v_ptr, voff, rn, re, TK, DV, svt, svd, UPCAST, IEEE)
    else:          # LSSA: one sweep (softplus needs no running max: |q̂·k̂| ≤ 1 bounds the scores)
        for n0 in range(0, full, BN):
            rn = n0 + tl.arange(0, BN)
            a = _weights(q, rq, scale, bias, k_ptr, koff, m_ptr, moff, rm, rn, TQ, TK, D, skt, skd, smq, smk, eps,
                         HAS_MASK, CAUSAL, False, UPCAST, IEEE, BD)
            total += tl.sum(a, axis=1)
            acc = _accumulate(acc, a, v_ptr, voff, rn, re, TK, DV, svt, svd, UPCAST, IEEE)
        for n0 in range(full, hi, BN):
            rn = n0 + tl.arange(0, BN)
            a = _weights(q, rq, scale, bias, k_ptr, koff, m_ptr, moff, rm, rn, TQ, TK, D, skt, skd, smq, smk, eps,
                         HAS_MASK, CAUSAL, True, UPCAST, IEEE, BD)
            total += tl.sum(a, axis=1)
            acc = _accumulate(acc, a, v_ptr, voff, rn, re, TK, DV, svt, svd, UPCAST, IEEE)
    out = acc / (total + eps)[:, None]
    if REWEIGHT:
        use = r_sum > 0.0
        if train_len > 0:
            use = use & (n > train_len)
        out = tl.where(use[:, None], acc_r / (r_sum + eps)[:, None], out)
    tl.store(o_ptr + b * sob + h * soh + rm[:, None] * sot + re[None, :] * sod, out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (re < DV)[None, :])


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    v = max(lo, next_pow2(max(int(n), 1)))
    return min(v, hi) if hi is not None else v


def supported(q, k, v, mask, gain=None, bias=None) -> str | None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} has no kernel"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "mixed dtypes"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return "needs (B, H, T, d) or (H, T, d) inputs"
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return "head dim > 256"
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        if mask is not None:
            torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2]))
    except RuntimeError:
        return "shapes do not broadcast"
    if torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]) != q.shape[:-2]:
        return "q must carry the batch dims"
    for name, t in (("gain", gain), ("bias", bias)):
        if t is not None and (t.numel() not in (1, q.shape[-3]) or not t.is_floating_point()
                              or t.device != q.device):
            return f"{name} must hold 1 or H floats on q's device"
    return None


SHARED_BUDGET = 96 * 1024


def pick_blocks(tq: int, tk: int, d: int, dv: int, operand_bytes: int, bm: int = 128) -> dict:
    """Tiles: small under the interpreter; on a GPU flash attention's BM = 128 query rows (`bm`) and the largest
    BN ≤ 64 whose pipelined K/V tiles (≈ 3 stages · BN · (BD + BDV) · operand bytes) fit SHARED_BUDGET, so every
    head dim ≤ 256 launches on an A100 (163 KiB per block) and an H100 (227 KiB) — fp32 with d = 128 at BN = 64
    would need 176 KiB; and 64 query rows where the q tile alone would pass 64 KiB (fp32, d 256)
    (`python -m codegen.compile_check` measures them)."""
    bd, bdv = _pow2(d), _pow2(dv)
    if interpreter():
        return dict(BM=_pow2(tq, hi=32), BN=_pow2(tk, hi=32), BD=bd, BDV=bdv)
    bn = 64
    while bn > 16 and 3 * bn * (bd + bdv) * operand_bytes > SHARED_BUDGET:
        bn //= 2
    if bm * bd * operand_bytes > 64 * 1024:     # the q tile too (fp32 d 256 at BM 128: 128 KiB, over an A100)
        bm = 64
    return dict(BM=_pow2(tq, hi=bm), BN=_pow2(tk, hi=bn), BD=bd, BDV=bdv)


def launch_options(blocks: dict, reweight: bool) -> dict:
    """num_warps / num_stages for a tile: 8 warps for 128-row tiles with d > 64 or two accumulators (LSSAR),
    else 4; 3 pipeline stages for the K/V loads (2 for LSSAR's extra register pressure). None under the
    interpreter."""
    if interpreter():
        return {}
    wide = blocks["BM"] >= 128 and (max(blocks["BD"], blocks["BDV"]) > 64 or reweight)
    return dict(num_warps=8 if wide else 4, num_stages=2 if reweight else 3)


def launch(q, k, v, mask, is_causal: bool, reweight: bool, p: float, train_len: int, eps: float,
           gain: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           blocks: dict | None = None, out: torch.Tensor | None = None, bm: int = 128) -> torch.Tensor:
    """rewrite::softplus_attention. `out` (q's shape with v's head dim), any strides, gets the result; `bm` the
    query tile on a GPU when `blocks` is not given; gain / bias: H or 1 elements (H = q.shape[-3])."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        out = out.unsqueeze(0) if out is not None else None
    bsz, heads, tq, d = q.shape
    tk, dv = k.shape[-2], v.shape[-1]
    k = k.expand(bsz, heads, tk, d)
    v = v.expand(bsz, heads, tk, dv)
    o = torch.empty(bsz, heads, tq, dv, dtype=q.dtype, device=q.device) if out is None else out
    if mask is not None:
        mask = mask.to(torch.bool)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(bsz, heads, tq, tk).view(torch.uint8)
    if blocks is None:
        blocks = pick_blocks(tq, tk, d, dv, 4 if mma_upcast(q.dtype) else 2, bm=bm)
    if bsz * heads and tq and dv:
        ms = mask.stride() if mask is not None else (0, 0, 0, 0)
        grid = (cdiv(tq, blocks["BM"]), bsz * heads)
        gain = gain.reshape(-1).contiguous() if gain is not None else None
        bias = bias.reshape(-1).contiguous() if bias is not None else None
        softplus_attention_kernel[grid](
            q, k, v, mask if mask is not None else q, o, gain if gain is not None else q,
            bias if bias is not None else q, heads, gain.numel() if gain is not None else 1,
            bias.numel() if bias is not None else 1, tq, tk, d, dv,
            math.log(d), float(p), int(train_len), float(eps),
            *q.stride(), *k.stride(), *v.stride(), *ms, *o.stride(),
            HAS_MASK=mask is not None, CAUSAL=bool(is_causal), REWEIGHT=bool(reweight),
            HAS_GAIN=gain is not None, HAS_BIAS=bias is not None, UPCAST=mma_upcast(q.dtype), IEEE=q.dtype == torch.float32, **blocks,
            **launch_options(blocks, reweight))
    if out is not None:
        return out.squeeze(0) if squeeze else out
    return o.squeeze(0) if squeeze else o


def candidates(q, k, v, mask, is_causal, reweight, p, train_len, eps, gain=None, bias=None):
    """Triton with 128-row query tiles (flash attention's), then 64-row ones (GPU only; one candidate where the
    tile rules already chose 64), then the aten path (the op's reference: the T × T weights materialised)."""
    args = (q, k, v, mask, is_causal, reweight, p, train_len, eps, gain, bias)
    out = []
    if interpreter():
        out.append(Candidate("triton", "triton", lambda: launch(*args)))
    else:
        seen = []
        for bm in (128, 64):
            blocks = pick_blocks(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1],
                                 4 if mma_upcast(q.dtype) else 2, bm=bm)
            if blocks not in seen:
                seen.append(blocks)
                out.append(Candidate(f"triton[BM{blocks['BM']} BN{blocks['BN']}]", "triton",
                                     lambda blocks=blocks: launch(*args, blocks=blocks)))
    out.append(Candidate("aten", "aten", lambda: reference(*args)))
    return out


def reference(q, k, v, mask, is_causal, reweight, p, train_len, eps, gain=None, bias=None):
    from rewriter.ops import softplus_attention as op
    return op.reference(q, k, v, mask, is_causal, reweight, p, train_len, eps, gain, bias)
