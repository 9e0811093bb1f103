"""Binary-coding quantisation (BCQ) with power-of-two scales — the math behind `shiftadd` (ShiftAddLLM).

For a weight W (out, in), split the input columns into groups of `group` (a multiple of 8; the last group is
zero-padded). Each row r and group j get q sign vectors and q scales:

    W[r, j·g:(j+1)·g] ≈ Σᵢ αᵢ[r, j] · Bᵢ[r, j, :],     Bᵢ ∈ {±1}^g,   αᵢ = Σₜ 2^{e[r, j, i, t]}   (t < terms)

Algorithm (per row and group, all vectorised):
    greedy      r = w; for i: bᵢ = sign(r) (0 → +1); αᵢ = snap(mean|r|); r -= αᵢ·bᵢ
    levels      the q-plane fit starts from the better of greedy(q) and the refined (q−1)-plane fit plus one
                greedy plane, so the error never grows with q
    refine      repeat `rounds` times: α = argmin ‖w − αᵀB‖ (least squares given B; negative αᵢ flip bᵢ);
                α ← snap(α); B ← best of the 2^q sign patterns for every element given α.
                A group keeps its best (α, B) so far: refinement never increases the error over greedy.
    snap        a sum of `terms` powers of two: floor(log2) for all but the last term, nearest for the last;
                zero is the exponent ZERO_EXP (-128).
    compensate  GPTQ-style (Frantar et al. 2022) with static groups: with H = mean xxᵀ + damping and
                U = chol(H⁻¹)ᵀ (upper), quantise the columns in order; α of a group is fitted when the group
                starts; each column's error eᵢ = (wᵢ − qᵢ)/U[i,i] is spread onto the later columns
                W[:, i+1:] -= eᵢ·U[i, i+1:]. This lowers the output error ‖X(W − Q)ᵀ‖ at the cost of weight error.

Storage (what the custom op `rewrite::shiftadd_linear` reads):
    signs      uint8 (q, out, in_pad/8): bit u of byte k of plane i is Bᵢ[·, 8k+u] == +1
    exponents  int8  (out, groups, q, terms)
Bits per weight = q + 8·q·terms/group (e.g. 3.19 at q = 3, group = 128).

LUT matmul (`lut_matmul`, the algorithm the Triton kernel implements): for every 8 activations x₀..x₇ a
256-entry table lut[idx] = Σᵤ (2·bitᵤ(idx) − 1)·xᵤ is built by doubling (start at −Σx, entry idx + 2ᵘ = entry idx
+ 2xᵤ); each packed sign byte indexes it; the per-group sums are scaled by ldexp(·, e) and summed over groups,
planes and terms. `dequantize` + matmul is the plain path; both agree within fp32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ZERO_EXP = -128          # exponent code meaning "this term is zero"
_MAX_EXP = 127
_MIN_EXP = -127


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
        e = lo.clamp(_MIN_EXP, _MAX_EXP)
        keep = positive & (lo >= _MIN_EXP)
        value = torch.where(keep, torch.ldexp(torch.ones_like(e), e), torch.zeros_like(e))
        exps.append(torch.where(keep, e, torch.full_like(e, ZERO_EXP)))
        total = total + value
        rem = rem - value
    return torch.stack(exps, -1).to(torch.int8), total


def exp_values(exps: torch.Tensor) -> torch.Tensor:
    """int8 exponents (..., terms) -> float32 scales (...): Σₜ 2^e (ZERO_EXP terms count 0)."""
    e = exps.float()
    return torch.where(exps == ZERO_EXP, torch.zeros_like(e), torch.ldexp(torch.ones_like(e), e)).sum(-1)


# ---- sign patterns ----------------------------------------------------------------------------------------
def _patterns(q: int, device=None) -> torch.Tensor:
    """All 2^q sign patterns, (2^q, q) of ±1."""
    idx = torch.arange(2 ** q, device=device)
    return ((idx[:, None] >> torch.arange(q, device=device)) & 1).float() * 2 - 1


def best_signs(w: torch.Tensor, alpha: torch.Tensor, with_error: bool = False):
    """w (R, G, g), alpha (R, G, q) -> B (R, G, q, g) ±1: for every element the sign pattern whose value
    Σᵢ αᵢ·bᵢ is nearest to it (exact search over the 2^q patterns: sort their values, binary-search w).
    With `with_error`, also the squared error per (row, group)."""
    pats = _patterns(alpha.shape[-1], w.device)                    # (P, q)
    values, order = (alpha @ pats.t()).sort(-1)                     # (R, G, P)
    pos = torch.searchsorted(values, w.contiguous())                # (R, G, g): first value >= w
    hi = pos.clamp(max=values.shape[-1] - 1)
    lo = (pos - 1).clamp(min=0)
    v_hi, v_lo = values.gather(-1, hi), values.gather(-1, lo)
    take_lo = (w - v_lo).abs() <= (v_hi - w).abs()
    signs = pats[order.gather(-1, torch.where(take_lo, lo, hi))].permute(0, 1, 3, 2).contiguous()
    if not with_error:
        return signs
    return signs, (w - torch.where(take_lo, v_lo, v_hi)).pow(2).sum(-1)


def _error(w, alpha, signs):
    """Squared error per (row, group)."""
    return (w - (alpha[..., None] * signs).sum(-2)).pow(2).sum(-1)


def greedy(w: torch.Tensor, q: int, terms: int = 1):
    """w (R, G, g) -> (alpha snapped (R, G, q), exps (R, G, q, terms), B (R, G, q, g))."""
    r = w.clone()
    alphas, exps, signs = [], [], []
    for _ in range(q):
        b = torch.where(r >= 0, 1.0, -1.0)
        e, a = snap_pow2(r.abs().mean(-1), terms)
        r = r - a[..., None] * b
        alphas.append(a)
        exps.append(e)
        signs.append(b)
    return torch.stack(alphas, -1), torch.stack(exps, -2), torch.stack(signs, -2)


def extend(w, alpha, exps, signs, terms: int = 1):
    """One more greedy plane on the residual of a (q-plane) fit -> a (q+1)-plane fit; never increases the error
    (the added αb with α = snap(mean|r|) < 2·mean|r| lowers ‖r‖²)."""
    r = w - (alpha[..., None] * signs).sum(-2)
    b = torch.where(r >= 0, 1.0, -1.0)
    e, a = snap_pow2(r.abs().mean(-1), terms)
    return (torch.cat([alpha, a[..., None]], -1), torch.cat([exps, e[..., None, :]], -2),
            torch.cat([signs, b[..., None, :]], -2))


def _pick(w, first, second):
    """Per (row, group), the fit of lower error among two (alpha, exps, signs) triples."""
    better = _error(w, second[0], second[2]) < _error(w, first[0], first[2])
    return (torch.where(better[..., None], second[0], first[0]),
            torch.where(better[..., None, None], second[1], first[1]),
            torch.where(better[..., None, None], second[2], first[2]))


def fit(w: torch.Tensor, q: int, rounds: int, terms: int = 1):
    """The full quantiser on grouped weights w (R, G, g): for q' = 1..q, start from the better of greedy(q') and
    the refined (q'−1)-plane fit extended by one greedy plane, then refine. Hence the error never exceeds greedy's
    and never grows with q (per group)."""
    a, e, s = refine(w, *greedy(w, 1, terms), rounds, terms)
    for level in range(2, q + 1):
        start = _pick(w, greedy(w, level, terms), extend(w, a, e, s, terms))
        a, e, s = refine(w, *start, rounds, terms)
    return a, e, s


def refine(w, alpha, exps, signs, rounds: int, terms: int = 1):
    """Alternating refinement from a (greedy) start; per group keeps the best so far. Same return as greedy."""
    best_err = _error(w, alpha, signs)
    q = alpha.shape[-1]
    ridge = 1e-9 * w.shape[-1] * torch.eye(q, device=w.device, dtype=torch.float64)  # equal planes: singular
    for _ in range(rounds):
        s64 = signs.double()
        gram = s64 @ s64.transpose(-1, -2) + ridge                 # (R, G, q, q)
        rhs = (s64 @ w.double()[..., None])[..., 0]                # (R, G, q)
        a = torch.linalg.solve(gram, rhs).abs().float()
        # try every up/down rounding of the last power-of-two term of the q scales (2^q candidates)
        for combo in range(2 ** q):
            up = ((combo >> torch.arange(q, device=w.device)) & 1).bool().expand_as(a)
            e, a_snap = snap_pow2(a, terms, up)
            s, err = best_signs(w, a_snap, with_error=True)
            better = err < best_err
            alpha = torch.where(better[..., None], a_snap, alpha)
            exps = torch.where(better[..., None, None], e, exps)
            signs = torch.where(better[..., None, None], s, signs)
            best_err = torch.where(better, err, best_err)
    return alpha, exps, signs


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

    @property
    def bits(self) -> int:
        return self.signs.shape[0]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.signs, self.exponents, self.in_features, self.group)

    @property
    def nbytes(self) -> int:
        return self.signs.numel() + self.exponents.numel()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.signs.shape[1] * self.in_features)


def padded_in(in_features: int, group: int) -> int:
    return -(-in_features // group) * group


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = w.shape
    pad = padded_in(in_f, group) - in_f
    w = torch.nn.functional.pad(w.float(), (0, pad))
    return w.view(out_f, -1, group)


def quantize(weight: torch.Tensor, bits: int = 3, group: int = 128, rounds: int = 5, terms: int = 1,
             hessian: torch.Tensor | None = None, damp: float = 0.01, chunk: int = 256) -> BCQWeight:
    """Quantise W (out, in). With `hessian` (in, in) = mean xxᵀ, GPTQ-style compensation is applied."""
    if group % 8:
        raise ValueError(f"group must be a multiple of 8, got {group}")
    w = weight.detach().float()
    out_f, in_f = w.shape
    if hessian is not None:
        return _quantize_gptq(w, bits, group, rounds, terms, hessian.float(), damp)
    exps_all, signs_all = [], []
    for start in range(0, out_f, chunk):
        wg = _grouped(w[start:start + chunk], group)
        a, e, s = fit(wg, bits, rounds, terms)
        exps_all.append(e)
        signs_all.append(pack_signs(s))
    return BCQWeight(torch.cat(signs_all, 1), torch.cat(exps_all, 0), in_f, group)


def _quantize_gptq(w, bits, group, rounds, terms, hessian, damp) -> BCQWeight:
    out_f, in_f = w.shape
    n_pad = padded_in(in_f, group)
    h = torch.zeros(n_pad, n_pad, dtype=torch.float64, device=w.device)
    h[:in_f, :in_f] = hessian.double()
    diag = h.diagonal()
    dead = diag <= 0                    # columns never excited (or padding): no information, keep them
    mean_diag = diag[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=torch.float64, device=w.device)
    diag[dead] = 1.0
    diag += damp * mean_diag
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    wp = torch.nn.functional.pad(w, (0, n_pad - in_f)).double()
    exps, signs = [], torch.empty(out_f, n_pad // group, bits, group, device=w.device)
    pats = _patterns(bits).double()
    for j in range(n_pad // group):
        cols = slice(j * group, (j + 1) * group)
        block = wp[:, cols].float()[:, None, :]
        a, e, _ = fit(block, bits, rounds, terms)
        exps.append(e[:, 0])
        values = a[:, 0].double() @ pats.t()                       # (out, P)
        for c in range(group):
            i = j * group + c
            col = wp[:, i]
            idx = (col[:, None] - values).abs().argmin(-1)
            qcol = values.gather(1, idx[:, None])[:, 0]
            signs[:, j, :, c] = pats[idx].float()
            err = (col - qcol) / u[i, i]
            wp[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    return BCQWeight(pack_signs(signs), torch.stack(exps, 1), in_f, group)


# ---- the two matmul paths ---------------------------------------------------------------------------------
def dequantize(signs: torch.Tensor, exponents: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """float32 W (out, in) from the packed form."""
    b = unpack_signs(signs)                                       # (q, out, in_pad)
    q, out_f, n_pad = b.shape
    scale = exp_values(exponents)                                 # (out, G, q)
    b = b.view(q, out_f, n_pad // group, group)
    w = (b * scale.permute(2, 0, 1)[..., None]).sum(0)            # (out, G, g)
    return w.reshape(out_f, n_pad)[:, :in_features]


def build_lut(x: torch.Tensor) -> torch.Tensor:
    """x (N, n) with n a multiple of 8 -> (N, n/8, 256): lut[·, k, idx] = Σᵤ (2·bitᵤ(idx) − 1)·x[·, 8k+u]."""
    xb = x.view(x.shape[0], -1, 8)
    lut = -xb.sum(-1, keepdim=True)
    for u in range(8):   # doubling: entries with bit u set = entries without it + 2·x_u
        lut = torch.cat([lut, lut + 2 * xb[..., u:u + 1]], -1)
    return lut


def lut_matmul(x: torch.Tensor, signs: torch.Tensor, exponents: torch.Tensor, in_features: int, group: int,
               bias: torch.Tensor | None = None, max_elements: int = 1 << 24) -> torch.Tensor:
    """y = x·Wᵀ (+ b) computed from packed signs through 256-entry tables and power-of-two scales.

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
    groups = exponents.shape[1]
    e = exponents.float()
    zero = exponents == ZERO_EXP
    y = x2.new_zeros(n, out_f)
    for r0 in range(0, n, row_block):
        xs = x2[r0:r0 + row_block]
        lut = build_lut(xs).reshape(xs.shape[0], nbytes * 256)
        for o0 in range(0, out_f, out_block):
            o1 = min(out_f, o0 + out_block)
            acc = y[r0:r0 + row_block, o0:o1]
            for i in range(q):   # bit planes (q ≤ 8), not rows
                idx = (signs[i, o0:o1].long() + base).reshape(-1)                         # (out·nbytes,)
                partial = lut.index_select(1, idx).view(xs.shape[0], o1 - o0, groups, group // 8).sum(-1)
                for t in range(exponents.shape[-1]):
                    scaled = torch.ldexp(partial, e[o0:o1, :, i, t])
                    acc += torch.where(zero[o0:o1, :, i, t], 0.0, scaled).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, out_f).to(x.dtype)


# ---- errors -----------------------------------------------------------------------------------------------
def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Frobenius ‖ref − approx‖ / ‖ref‖."""
    den = ref.double().norm().item()
    return (ref.double() - approx.double()).norm().item() / den if den > 0 else 0.0
