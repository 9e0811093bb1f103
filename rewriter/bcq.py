"""Binary-coding quantisation (BCQ) with power-of-two scales — the math behind `shiftadd` (ShiftAddLLM).

For a weight W (out, in), split the input columns into groups of `group` (a multiple of 8; the last group is
zero-padded). Each row r and group j get q sign vectors and q scales:

    W[r, j·g:(j+1)·g] ≈ Σᵢ αᵢ[r, j] · Bᵢ[r, j, :],     Bᵢ ∈ {±1}^g,   αᵢ = Σₜ 2^{e[r, j, i, t]}   (t < terms)

Fitting (rewriter/bcq_fit.py): a grid per group — uniform and greedy starts, alternating least squares, an exact
search over the power-of-two snappings — and, calibrated, GPTQ-style error feedback (Frantar et al. 2022) followed by
a coordinate-descent refit of the scales under the calibration Gram that never increases the output error.

Two codes share that form and one op:
    pow2     (ShiftAddLLM) every (row, group, plane) has its own αᵢ, a sum of `terms` powers of two: no multiply.
    affine   (LUT-GEMM-like, uniform grid) the planes are fixed powers of two, αᵢ = 2^{i−1}, shared by every group,
             and each (row, group) has one scale s and one offset β (fp16):
                 W[r, j·g:(j+1)·g] ≈ s[r, j]·Σᵢ 2^{i−1}·Bᵢ + β[r, j]
             i.e. the asymmetric uniform grid with 2^q levels (level L = Σᵢ 2^i·bitᵢ, value s·(L − (2^q−1)/2) + β):
             round-to-nearest's grid is one of its members, so a fit of it is never worse than round-to-nearest.
             Per (row, group) the planes are combined by shifts, then one multiply by s and one by β·Σx.

Storage (what the custom op `rewrite::shiftadd_linear` reads):
    signs      uint8 (q, out, in_pad/8): bit u of byte k of plane i is Bᵢ[·, 8k+u] == +1
    exponents  int8  (out, groups, q, terms), or broadcastable to it ((1, 1, q, 1) for the affine code)
    scales     None, or (out, groups) float: multiplies the group's Σᵢ αᵢ·Bᵢ
    offsets    None, or (out, groups) float: added to every weight of the group
               (affine code: fp16 tensors, or — `scale_bits` > 0 — the output of `rewrite::group_values`, which
               decodes them from integer codes with one fp16 step per 8 groups: rewriter/group_codes.py)
Bits per weight = q + 8·q·terms/group (pow2; e.g. 3.19 at q = 3, group = 128), q + 32/group (affine with fp16
scales: the same as round-to-nearest with an fp16 scale and zero point per group), q + (2b + 4)/group (affine with
b-bit codes: 4.5 at q = 4, b = 6, group = 32, like llama.cpp's Q4_K).

LUT matmul (`lut_matmul`, the algorithm the Triton kernel implements): for every 8 activations x₀..x₇ a
256-entry table lut[idx] = Σᵤ (2·bitᵤ(idx) − 1)·xᵤ is built by doubling (start at −Σx, entry idx + 2ᵘ = entry idx
+ 2xᵤ); each packed sign byte indexes it; the per-group sums are scaled by ldexp(·, e) and summed over groups,
planes and terms. `dequantize` + matmul is the plain path; both agree within fp32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import group_codes

ZERO_EXP = -128          # exponent code meaning "this term is zero"
MAX_EXP = 127
MIN_EXP = -127


# ---- power-of-two snapping ---------------------------------------------------------------------------------
def snap_pow2(alpha: torch.Tensor, terms: int = 1, last_up: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha ≥ 0 (any shape) -> (exponents int8 (..., terms), snapped values float32 (same shape as alpha)).

    The last term rounds to the nearer power of two, or up/down where the bool mask `last_up` says so."""
    rem = alpha.float().clamp_min(0)
    exps, total = [], torch.zeros_like(rem)
    for t in range(terms):
        positive = rem > 0
        safe = torch.where(positive, rem, torch.ones_like(rem))
        lo = torch.floor(torch.log2(safe))
        # log2 can be off by one ulp near powers of two: fix floor so that 2^lo <= rem < 2^(lo+1)
        lo = torch.where(torch.ldexp(torch.ones_like(lo), lo) > safe, lo - 1, lo)
        lo = torch.where(torch.ldexp(torch.ones_like(lo), lo + 1) <= safe, lo + 1, lo)
        if t == terms - 1 and last_up is not None:
            lo = lo + last_up.to(lo.dtype)
        elif t == terms - 1:   # nearest: 2^lo or 2^(lo+1)
            lo = torch.where(safe - torch.ldexp(torch.ones_like(lo), lo) > torch.ldexp(torch.ones_like(lo), lo + 1)
                             - safe, lo + 1, lo)
        e = lo.clamp(MIN_EXP, MAX_EXP)
        keep = positive & (lo >= MIN_EXP)
        value = torch.where(keep, torch.ldexp(torch.ones_like(e), e), torch.zeros_like(e))
        exps.append(torch.where(keep, e, torch.full_like(e, ZERO_EXP)))
        total = total + value
        rem = rem - value
    return torch.stack(exps, -1).to(torch.int8), total


def exp_values(exps: torch.Tensor) -> torch.Tensor:
    """int8 exponents (..., terms) -> float32 scales (...): Σₜ 2^e (ZERO_EXP terms count 0)."""
    e = exps.float()
    return torch.where(exps == ZERO_EXP, torch.zeros_like(e), torch.ldexp(torch.ones_like(e), e)).sum(-1)


# ---- packing ----------------------------------------------------------------------------------------------
def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """B (R, G, q, g) ±1 -> uint8 (q, R, G·g/8); bit u of byte k is +1 at column 8k+u."""
    r, g_count, q, g = signs.shape
    bits = (signs > 0).permute(2, 0, 1, 3).reshape(q, r, g_count * g // 8, 8).to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.uint8, device=signs.device))
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (q, R, nbytes) -> float32 ±1 (q, R, nbytes·8)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1).float() * 2 - 1


# ---- the quantiser ----------------------------------------------------------------------------------------
@dataclass
class BCQWeight:
    signs: torch.Tensor       # uint8 (q, out, in_pad/8)
    exponents: torch.Tensor   # int8 (out, groups, q, terms)
    in_features: int
    group: int
    scales: torch.Tensor | None = None    # (out, groups) fp16: the affine code's per-group scale
    offsets: torch.Tensor | None = None   # (out, groups) fp16: the affine code's per-group offset
    # the affine code with coded scales (rewriter/group_codes.py): what is stored; `scales` / `offsets` are then
    # their decoded float32 values
    scale_codes: group_codes.GroupCodes | None = None
    offset_codes: group_codes.GroupCodes | None = None

    @property
    def bits(self) -> int:
        return self.signs.shape[0]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.signs, self.exponents, self.in_features, self.group, self.scales, self.offsets)

    @property
    def nbytes(self) -> int:
        if self.scale_codes is not None:
            extra = self.scale_codes.nbytes + self.offset_codes.nbytes
        else:
            extra = sum(t.numel() * t.element_size() for t in (self.scales, self.offsets) if t is not None)
        return self.signs.numel() + self.exponents.numel() + extra

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.signs.shape[1] * self.in_features)


def padded_in(in_features: int, group: int) -> int:
    return -(-in_features // group) * group


def quantize(weight: torch.Tensor, bits: int = 3, group: int = 128, rounds: int = 2, terms: int = 1,
             hessian: torch.Tensor | None = None, damp: float = 0.01, refit: int = 1) -> BCQWeight:
    """Quantise W (out, in) (rewriter/bcq_fit.py): grid fit per group, or — with `hessian` (in, in) = mean x·xᵀ —
    GPTQ-style error feedback followed by `refit` sweeps of scale refitting under the same H."""
    from . import bcq_fit
    if group % 8:
        raise ValueError(f"group must be a multiple of 8, got {group}")
    w = weight.detach().float()
    out_f, in_f = w.shape
    if hessian is None:
        exps, pattern = bcq_fit.quantize_plain(w, bits, group, terms, rounds)
    else:
        exps, pattern = bcq_fit.gptq(w, hessian, bits, group, terms, rounds, damp)
        if refit:
            exps = bcq_fit.refit_scales(w, hessian, exps, pattern, bits, terms, refit)
    return from_patterns(exps, pattern, in_f, group)


def affine_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of the affine code's scales and offsets for a model of `weight_dtype`."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def affine_exponents(q: int, device=None) -> torch.Tensor:
    """The affine code's shared plane exponents (1, 1, q, 1): αᵢ = 2^{i−1}."""
    return (torch.arange(q, device=device) - 1).to(torch.int8).view(1, 1, q, 1)


def quantize_affine(weight: torch.Tensor, bits: int = 4, group: int = 64, hessian: torch.Tensor | None = None,
                    damp: float = 0.1, refit: int = 1, dtype: torch.dtype = torch.float16,
                    scale_bits: int = 0) -> BCQWeight:
    """Quantise W (out, in) to the affine code (rewriter/bcq_fit.py): per-group grid (clip search), then — with
    `hessian` — GPTQ error feedback and a least-squares refit of the scales and offsets under H. Scales and
    offsets are stored in `dtype` — fp16, or bf16 for a bf16 model (fp16's range is narrower) — or, scale_bits > 0,
    as codes of that many bits under one `dtype` step per 8 groups (rewriter/group_codes.py)."""
    from . import bcq_fit
    if group % 8:
        raise ValueError(f"group must be a multiple of 8, got {group}")
    w = weight.detach().float()
    scales, offsets, levels = bcq_fit.quantize_affine(w, bits, group, hessian, damp, refit, dtype, scale_bits)
    exps = affine_exponents(bits, w.device)
    packed = from_patterns(exps, levels, w.shape[1], group)
    if not scale_bits:
        return BCQWeight(packed.signs, exps, w.shape[1], group, scales.to(dtype), offsets.to(dtype))
    coded = [group_codes.encode(v, scale_bits, signed, dtype) for v, signed in ((scales, False), (offsets, True))]
    return BCQWeight(packed.signs, exps, w.shape[1], group, coded[0].decode(), coded[1].decode(), *coded)


def from_patterns(exps: torch.Tensor, pattern: torch.Tensor, in_features: int, group: int) -> BCQWeight:
    """The packed form of exponents (out, G, q, terms) and sign patterns (out, G, g) (bit i of a pattern = plane i)."""
    q = exps.shape[2]
    out_f = pattern.shape[0]
    flat = pattern.reshape(out_f, -1).to(torch.uint8)          # patterns < 2^q ≤ 256; one byte per weight
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=pattern.device)
    planes = [(((flat >> i) & 1).view(out_f, -1, 8) * weights).sum(-1, dtype=torch.uint8) for i in range(q)]
    return BCQWeight(torch.stack(planes), exps.to(torch.int8), in_features, group)


# ---- the two matmul paths ---------------------------------------------------------------------------------
def full_exponents(signs: torch.Tensor, exponents: torch.Tensor, group: int) -> torch.Tensor:
    """exponents expanded (a view) to (out, groups, q, terms) — the affine code stores them broadcastable."""
    q, out_f, nbytes = signs.shape
    return exponents.expand(out_f, nbytes * 8 // group, q, exponents.shape[-1])


def dequantize(signs: torch.Tensor, exponents: torch.Tensor, in_features: int, group: int,
               scales: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """float32 W (out, in) from the packed form."""
    b = unpack_signs(signs)                                       # (q, out, in_pad)
    q, out_f, n_pad = b.shape
    scale = exp_values(full_exponents(signs, exponents, group))  # (out, G, q)
    b = b.view(q, out_f, n_pad // group, group)
    w = (b * scale.permute(2, 0, 1)[..., None]).sum(0)            # (out, G, g)
    if scales is not None:
        w = w * scales.float()[..., None]
    if offsets is not None:
        w = w + offsets.float()[..., None]
    return w.reshape(out_f, n_pad)[:, :in_features]


def build_lut(x: torch.Tensor) -> torch.Tensor:
    """x (N, n) with n a multiple of 8 -> (N, n/8, 256): lut[·, k, idx] = Σᵤ (2·bitᵤ(idx) − 1)·x[·, 8k+u]."""
    xb = x.view(x.shape[0], -1, 8)
    lut = -xb.sum(-1, keepdim=True)
    for u in range(8):   # doubling: entries with bit u set = entries without it + 2·x_u
        lut = torch.cat([lut, lut + 2 * xb[..., u:u + 1]], -1)
    return lut


def lut_matmul(x: torch.Tensor, signs: torch.Tensor, exponents: torch.Tensor, in_features: int, group: int,
               bias: torch.Tensor | None = None, max_elements: int = 1 << 24, scales: torch.Tensor | None = None,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ b) computed from packed signs through 256-entry tables and power-of-two scales (then, for the
    affine code, one multiply by the group's scale and one of the group's input sum by its offset).

    Vectorised over rows of x and of W; the only Python loops are over the q bit planes, the terms, and — when
    the gathered partial sums (N·out·in/8 values per plane) would exceed `max_elements` — over blocks of output
    features (and of x's rows), to bound memory."""
    q, out_f, nbytes = signs.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    x2 = torch.nn.functional.pad(x2, (0, nbytes * 8 - x2.shape[-1]))
    n = x2.shape[0]
    row_block = max(1, min(n, max_elements // (nbytes * 256)))
    out_block = max(1, min(out_f, max_elements // (row_block * nbytes)))
    base = torch.arange(nbytes, device=x.device) * 256
    exponents = full_exponents(signs, exponents, group)
    groups = exponents.shape[1]
    e = exponents.float()
    zero = exponents == ZERO_EXP
    y = x2.new_zeros(n, out_f)
    for r0 in range(0, n, row_block):
        xs = x2[r0:r0 + row_block]
        lut = build_lut(xs).reshape(xs.shape[0], nbytes * 256)
        for o0 in range(0, out_f, out_block):
            o1 = min(out_f, o0 + out_block)
            acc = xs.new_zeros(xs.shape[0], o1 - o0, groups)                              # per-group sums
            for i in range(q):   # bit planes (q ≤ 8), not rows
                idx = (signs[i, o0:o1].long() + base).reshape(-1)                         # (out·nbytes,)
                partial = lut.index_select(1, idx).view(xs.shape[0], o1 - o0, groups, group // 8).sum(-1)
                for t in range(exponents.shape[-1]):
                    scaled = torch.ldexp(partial, e[o0:o1, :, i, t])
                    acc += torch.where(zero[o0:o1, :, i, t], 0.0, scaled)
            if scales is not None:
                acc = acc * scales[o0:o1].float()
            if offsets is not None:
                acc = acc + offsets[o0:o1].float() * xs.view(xs.shape[0], 1, groups, group).sum(-1)
            y[r0:r0 + row_block, o0:o1] = acc.sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, out_f).to(x.dtype)


# ---- errors -----------------------------------------------------------------------------------------------
def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Frobenius ‖ref − approx‖ / ‖ref‖."""
    den = ref.double().norm().item()
    return (ref.double() - approx.double()).norm().item() / den if den > 0 else 0.0
