"""Fitting binary-coded weights — the quantiser behind `shiftadd` — and the round-to-nearest baseline.

Per row r and group j (g input columns) a fit has q scales α (each a sum of `terms` powers of two, rewriter/bcq.py)
that define 2^q values v_p = Σᵢ (2·bitᵢ(p) − 1)·αᵢ, p ∈ [0, 2^q); every weight takes one pattern p (its q sign bits).

grid fit (`fit_grid`, per group, all rows at once)
    start      the better per group of the uniform grid α = c·(2^{q−1}, …, 2, 1), c = max|w|/(2^q − 1) (symmetric
               round-to-nearest) and the refined greedy fit (plane i = sign of the residual, then all scales so far
               re-solved by least squares, Xu et al. 2018)
    alternate  `rounds` times with continuous α: patterns = the nearest value; α = least squares given the patterns
               (weighted by the columns' importance when given: diag of the calibration Gram)
    snap       α → sums of `terms` powers of two: each αᵢ to its nearest snapping, then each one's other rounding
               (the last term up instead of down or back) tried in turn, then each one doubled or halved (an
               octave: the continuous fit can sit one away from a small scale), kept where the exact error drops
error feedback (`gptq`, calibrated; Frantar et al. 2022 with static groups and act-order)
    H = mean x·xᵀ + λI (λ = 1 % of its mean diagonal). Every group's grid is fitted first (static groups, columns
    weighted by diag H); then the columns are visited in order of decreasing diag H (act-order: the inputs that
    carry the most energy are rounded while the most freedom is left to compensate them), with U = chol(H⁻¹)ᵀ of
    the permuted H, in blocks of 128 with lazy updates: each column takes its nearest grid value and its scaled
    error e = (w − q)/U[i,i] is pushed onto the later columns, W[:, k] −= e·U[i, k] for k > i. This minimises
    tr(ΔW·H·ΔWᵀ) greedily, column by column.
scale refit (`refit_scales`, calibrated)
    With the patterns fixed, f(α) = tr(ΔW·H·ΔWᵀ) is a quadratic in each scale. Coordinate descent over the
    (group, plane) scales, all rows at once: with g = H·(W − Ŵ)ᵀ the unconstrained optimum of one scale is
    α* = α + bᵀg_j / bᵀH_jj·b, and the scale takes the best of {α, snap↓(α*), snap↑(α*), 0} by the exact change
    Δf = −2δ·bᵀg_j + δ²·bᵀH_jj·b. f never increases, so the refit result is never worse than GPTQ's.
the affine code (`quantize_affine`; rewriter/bcq.py: W ≈ s·(L − (2^q−1)/2) + β per (row, group), levels L)
    grid       per (row, group) the min/max range, shrunk about its midpoint by the clip ratio (1, 0.95, …, 0.75)
               with the least squared rounding error (columns weighted by diag H when calibrated); s, β in fp16,
               or — scale_bits > 0 — coded (rewriter/group_codes.py: `bits`-bit codes, one fp16 step per 8 groups;
               every later step also rounds what it solves to the codes, `stored`)
    feedback   calibrated: GPTQ's loop above over these fixed grids (act-order, static groups), damping 10 %
    refit      calibrated: with the levels fixed each row's error is a quadratic in its 2G unknowns (s, β): solved
               exactly (`refit_affine`), rounded to fp16, kept per row where it is lower
    fallback   per row, round-to-nearest's levels and grid wherever they have the lower calibrated error: a row's
               error is its own term of tr(ΔW·H·ΔWᵀ), so the layer is never worse than round-to-nearest there
round-to-nearest (`rtn`)
    asymmetric min/max uniform grid per group with 2^bits levels, scale and range midpoint in fp16 (bits + 32/group
    bits per weight) or coded like the affine code's (bits + (2·scale_bits + 4)/group) — the baseline tests and the
    benchmark hold shiftadd to; it is the affine code at clip ratio 1 with nearest levels (`rtn_group` gives the RTN group with the same bits per weight as a pow2 configuration).
All fits run in float32 (float64 for Gram algebra) on the weight's device and are deterministic.
"""
from __future__ import annotations

import torch

from . import bcq, group_codes

DAMP = 0.01
AFFINE_DAMP = 0.1    # the affine code's damping: 10 % of the mean diagonal generalises better to held-out text
                     # than 1 % (SmolLM2, 4 bits, 10 layers: 0.0425 against 0.0443; python -m bench.quant_layers)


# ---- patterns and nearest values --------------------------------------------------------------------------------
def patterns(q: int, device) -> torch.Tensor:
    """(2^q, q) float32 ±1: row p holds the signs of pattern p (bit i set -> +1)."""
    idx = torch.arange(2 ** q, device=device)
    return ((idx[:, None] >> torch.arange(q, device=device)) & 1).float() * 2 - 1


def nearest(w: torch.Tensor, alpha: torch.Tensor, pats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, g), alpha (N, q) -> (value (N, g), pattern index (N, g) int64) of the nearest grid value."""
    values, order = (alpha @ pats.t()).sort(-1)                     # (N, P)
    pos = torch.searchsorted(values, w.contiguous())
    hi = pos.clamp(max=values.shape[-1] - 1)
    lo = (pos - 1).clamp(min=0)
    v_hi, v_lo = values.gather(-1, hi), values.gather(-1, lo)
    take_lo = (w - v_lo).abs() <= (v_hi - w).abs()
    return torch.where(take_lo, v_lo, v_hi), order.gather(-1, torch.where(take_lo, lo, hi))


def _error(w, value, weight):
    d = (w - value).square()
    return (d * weight).sum(-1) if weight is not None else d.sum(-1)


# ---- grid fit ------------------------------------------------------------------------------------------------------
def _least_squares(w, pattern, pats, weight):
    """α (N, q) minimising Σ weight·(w − Σᵢ αᵢ bᵢ)² for the given patterns (|α|: a negative scale flips signs)."""
    b = pats[pattern].double()                                      # (N, g, q)
    bw = b * weight.double()[..., None] if weight is not None else b
    gram = bw.transpose(-1, -2) @ b
    rhs = (bw.transpose(-1, -2) @ w.double()[..., None])[..., 0]
    ridge = 1e-9 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=w.device)
    return torch.linalg.solve(gram + ridge[:, None, None] * eye, rhs).abs().float()


def _greedy(w, q, weight):
    """Refined greedy (Xu et al. 2018): plane i takes the signs of the residual, then all i scales are re-solved by
    least squares for the planes so far; the residual is taken against that. -> alpha (N, q)."""
    planes = []
    r = w
    for _ in range(q):
        planes.append(torch.where(r >= 0, 1.0, -1.0))
        b = torch.stack(planes, -1).double()                        # (N, g, i)
        bw = b * weight.double()[..., None] if weight is not None else b
        gram = bw.transpose(-1, -2) @ b
        ridge = 1e-9 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=w.device)
        alpha = torch.linalg.solve(gram + ridge[:, None, None] * eye,
                                   (bw.transpose(-1, -2) @ w.double()[..., None])[..., 0])
        r = w - (b @ alpha[..., None])[..., 0].float()
    return alpha.abs().float()


def _snap_search(w, alpha, terms, pats, weight):
    """The po2 snapping of alpha (N, q): nearest snapping, then each scale's other rounding (up ↔ down) tried in
    turn and kept where it lowers the exact error. -> (exponents (N, q, terms) int8, snapped alpha, error)."""
    q = alpha.shape[-1]
    e_dn, a_dn = bcq.snap_pow2(alpha, terms, torch.zeros_like(alpha, dtype=torch.bool))
    e_up, a_up = bcq.snap_pow2(alpha, terms, torch.ones_like(alpha, dtype=torch.bool))
    up = (a_up - alpha) < (alpha - a_dn)                           # nearest snapping of each scale
    exps, snapped = torch.where(up[..., None], e_up, e_dn), torch.where(up, a_up, a_dn)
    err = _error(w, nearest(w, snapped, pats)[0], weight)
    for i in range(q):
        flip = snapped.clone()
        flip[:, i] = torch.where(up[:, i], a_dn[:, i], a_up[:, i])
        err2 = _error(w, nearest(w, flip, pats)[0], weight)
        better = err2 < err
        up[:, i] = torch.where(better, ~up[:, i], up[:, i])
        snapped = torch.where(better[:, None], flip, snapped)
        exps[:, i] = torch.where(better[:, None], torch.where(up[:, i, None], e_up[:, i], e_dn[:, i]), exps[:, i])
        err = torch.where(better, err2, err)
    # then whole octaves: each scale doubled or halved (every term's exponent ±1), kept where the exact error drops —
    # the continuous fit can sit an octave away from a small scale (α = 2^-4 fitted as 2^-3 when the larger scales
    # absorbed part of it), which no rounding of it reaches
    for _ in range(2):
        moved_any = False
        for i in range(q):
            for shift in (1, -1):
                e_i = exps[:, i].int()
                used = e_i != bcq.ZERO_EXP
                e_new = torch.where(used, e_i + shift, e_i)
                ok = (used.any(-1) & ((e_new >= bcq.MIN_EXP) & (e_new <= bcq.MAX_EXP) | ~used).all(-1))
                trial = snapped.clone()
                trial[:, i] = torch.ldexp(snapped[:, i], torch.full_like(snapped[:, i], shift))
                err2 = _error(w, nearest(w, trial, pats)[0], weight)
                better = (err2 < err) & ok
                if bool(better.any()):
                    moved_any = True
                    snapped = torch.where(better[:, None], trial, snapped)
                    exps[:, i] = torch.where(better[:, None], e_new.to(torch.int8), exps[:, i])
                    err = torch.where(better, err2, err)
        if not moved_any:
            break
    return exps, snapped, err


def fit_grid(w: torch.Tensor, q: int, terms: int = 1, rounds: int = 2, weight: torch.Tensor | None = None):
    """w (N, g) -> (exponents (N, q, terms) int8, snapped alpha (N, q) float32) of the grid fit (module docstring);
    `weight` (g,) or (N, g): per-column importance in the error."""
    w = w.float()
    pats = patterns(q, w.device)
    m = w.abs().amax(-1)
    uniform = (m / (2 ** q - 1))[:, None] * (2.0 ** torch.arange(q - 1, -1, -1, device=w.device)).float()
    alpha, err, pattern = None, None, None
    for a in (uniform, _greedy(w, q, weight)):
        value, idx = nearest(w, a, pats)
        e_a = _error(w, value, weight)
        if alpha is None:
            alpha, err, pattern = a, e_a, idx
        else:
            better = e_a < err
            alpha, err = torch.where(better[:, None], a, alpha), torch.where(better, e_a, err)
            pattern = torch.where(better[:, None], idx, pattern)
    start = alpha
    for _ in range(rounds):
        new = _least_squares(w, pattern, pats, weight)
        value, idx = nearest(w, new, pats)
        e_new = _error(w, value, weight)
        better = e_new < err
        alpha, err = torch.where(better[:, None], new, alpha), torch.where(better, e_new, err)
        pattern = torch.where(better[:, None], idx, pattern)
    exps, snapped, err = _snap_search(w, alpha, terms, pats, weight)
    if rounds:   # the refined scales may snap worse than the start: keep the better snapped grid
        e0, s0, err0 = _snap_search(w, start, terms, pats, weight)
        better = err0 < err
        exps, snapped = torch.where(better[:, None, None], e0, exps), torch.where(better[:, None], s0, snapped)
    return exps, snapped


# ---- whole layers ------------------------------------------------------------------------------------------------------
def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """W (out, in) zero-padded to whole groups, float32, as (out, G, group)."""
    out_f, in_f = w.shape
    pad = bcq.padded_in(in_f, group) - in_f
    return torch.nn.functional.pad(w.float(), (0, pad)).contiguous().view(out_f, -1, group)


def quantize_plain(w: torch.Tensor, q: int, group: int, terms: int, rounds: int = 2,
                   weight: torch.Tensor | None = None, chunk: int = 1 << 18):
    """Grid fit of every group, nearest values: (exponents (out, G, q, terms), pattern (out, G, g) int64)."""
    wg = grouped(w, group)
    out_f, groups, g = wg.shape
    flat = wg.reshape(-1, g)
    if weight is None and groups * g != w.shape[1]:      # zero padding must not count in the fit
        weight = torch.ones(w.shape[1], device=w.device)
    wflat = None if weight is None else grouped(weight[None, :], group).expand(out_f, groups, g).reshape(-1, g)
    pats = patterns(q, w.device)
    exps, pats_idx = [], []
    rows = max(1, chunk // g)
    for s in range(0, flat.shape[0], rows):
        part = flat[s:s + rows]
        wt = None if wflat is None else wflat[s:s + rows]
        e, a = fit_grid(part, q, terms, rounds, wt)
        exps.append(e)
        pats_idx.append(nearest(part, a, pats)[1])
    return (torch.cat(exps).view(out_f, groups, q, terms), torch.cat(pats_idx).view(out_f, groups, g))


def damped_diagonal(h: torch.Tensor, size: int, damp: float = DAMP) -> torch.Tensor:
    """The diagonal of `damped(h, size, damp)`, (size,) float64, from h's diagonal alone."""
    diag = torch.zeros(size, dtype=torch.float64, device=h.device)
    diag[:h.shape[0]] = h.diagonal().double()
    dead = diag <= 0
    positive = diag[~dead]
    mean = float(positive.mean()) if positive.numel() else 1.0
    diag[dead] = mean            # never-excited columns (and padding): no information, keep them as they are
    return diag + damp * mean


def damped(h: torch.Tensor, size: int, damp: float = DAMP) -> torch.Tensor:
    """H zero-padded to (size, size) float64, its diagonal as `damped_diagonal` gives it."""
    out = torch.zeros(size, size, dtype=torch.float64, device=h.device)
    n = h.shape[0]
    out[:n, :n] = h                                                # converted in place: no float64 temporary
    out.diagonal().copy_(damped_diagonal(h, size, damp))
    return out


def gptq(w: torch.Tensor, h: torch.Tensor, q: int, group: int, terms: int, rounds: int, damp: float = DAMP):
    """Error-feedback quantisation (module docstring): (exponents (out, G, q, terms), pattern (out, G, g))."""
    out_f, in_f = w.shape
    n = bcq.padded_in(in_f, group)
    groups = n // group
    work = torch.nn.functional.pad(w.float(), (0, n - in_f)).contiguous()
    # static groups: every grid from the weights as given, columns weighted by their diag(H) importance
    importance = damped_diagonal(h, n, damp).float()
    importance[in_f:] = 0                                              # padding: not a weight
    flat, weights = work.view(-1, group), importance.view(groups, group).repeat(out_f, 1)
    rows = max(1, (1 << 18) // group)      # the fit's temporaries are ~100 B per weight: bounded per chunk of rows
    parts = [fit_grid(flat[s:s + rows], q, terms, rounds, weights[s:s + rows]) for s in range(0, flat.shape[0], rows)]
    exps = torch.cat([e for e, _ in parts]).view(out_f, groups, q, terms)
    alpha = torch.cat([a for _, a in parts]).view(out_f, groups, q)
    del parts, flat, weights
    values = alpha @ patterns(q, w.device).t()                          # (out, G, 2^q): every grid value
    pattern = error_feedback(work, h, damp, importance, values, group)
    return exps, pattern.view(out_f, groups, group)


def error_feedback(work: torch.Tensor, h: torch.Tensor, damp: float, importance: torch.Tensor, values: torch.Tensor,
                   group: int) -> torch.Tensor:
    """GPTQ's loop (module docstring) over fixed per-group grids: work (out, n) the padded weight, h the Gram (damped
    here: `damped(h, n, damp)`), values (out, G, P) each group's grid values. Columns are visited in act-order
    (decreasing `importance`), blocks of 128 with lazy updates. -> the chosen value index per weight (out, n) int64."""
    out_f, n = work.shape
    perm = torch.argsort(importance, descending=True, stable=True)      # act-order: important columns first
    u = _inverse_factor(damped(h, n, damp), perm)
    work = work[:, perm].contiguous()
    group_of = (perm // group).tolist()
    columns = perm.tolist()
    pattern = torch.empty(out_f, n, dtype=torch.long, device=work.device)
    block = 128
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        wb = work[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            grid = values[:, group_of[b0 + i]]
            idx = (grid - wb[:, i:i + 1]).abs().argmin(-1)                 # nearest grid value (exact search)
            pattern[:, columns[b0 + i]] = idx
            e_col = (wb[:, i] - grid.gather(1, idx[:, None])[:, 0]) / ub[i, i]
            wb[:, i + 1:] -= e_col[:, None] * ub[i, i + 1:][None, :]
            err[:, i] = e_col
        work[:, b1:] -= err @ u[b0:b1, b1:]
    return pattern


def dequant_parts(exps: torch.Tensor, pattern: torch.Tensor, q: int) -> torch.Tensor:
    """float32 W (out, G·g) from exponents (out, G, q, terms) and patterns (out, G, g)."""
    alpha = bcq.exp_values(exps)                                   # (out, G, q)
    pats = patterns(q, exps.device)
    return (pats[pattern] * alpha[:, :, None, :]).sum(-1).reshape(exps.shape[0], -1)


def refit_scales(w: torch.Tensor, h: torch.Tensor, exps: torch.Tensor, pattern: torch.Tensor, q: int,
                 terms: int, sweeps: int = 1, damp: float = 1e-6) -> torch.Tensor:
    """Coordinate descent on the scales under H with the patterns fixed (module docstring): new exponents."""
    out_f, groups, g = pattern.shape
    n = groups * g
    hd = damped(h, n, damp).float()
    target = torch.nn.functional.pad(w.float(), (0, n - w.shape[1]))
    pats = patterns(q, w.device)
    signs = pats[pattern]                                          # (out, G, g, q)
    alpha = bcq.exp_values(exps)                                   # (out, G, q)
    exps = exps.clone()
    approx = (signs * alpha[:, :, None, :]).sum(-1).reshape(out_f, n)
    grad = (target - approx) @ hd                                  # g = (W − Ŵ)·H, (out, n)
    zero_e = torch.full((out_f, terms), bcq.ZERO_EXP, dtype=torch.int8, device=w.device)
    for _ in range(sweeps):
        for j in range(groups):
            cols = slice(j * g, (j + 1) * g)
            hjj = hd[cols, cols]
            for i in range(q):
                b = signs[:, j, :, i]                              # (out, g)
                lin = (b * grad[:, cols]).sum(-1)                  # bᵀ g_j
                quad = ((b @ hjj) * b).sum(-1).clamp_min(1e-30)    # bᵀ H_jj b
                cur = alpha[:, j, i]
                star = (cur + lin / quad).clamp_min(0)
                best_d = torch.zeros_like(cur)
                best_f = torch.zeros_like(cur)
                best_e = exps[:, j, i].clone()
                candidates = [bcq.snap_pow2(star, terms, torch.zeros_like(star, dtype=torch.bool)),
                              bcq.snap_pow2(star, terms, torch.ones_like(star, dtype=torch.bool)),
                              (zero_e, torch.zeros_like(cur))]
                for e_c, a_c in candidates:
                    d = a_c - cur
                    f = -2 * d * lin + d * d * quad
                    better = f < best_f
                    best_d, best_f = torch.where(better, d, best_d), torch.where(better, f, best_f)
                    best_e = torch.where(better[:, None], e_c, best_e)
                changed = best_d != 0
                if not bool(changed.any()):
                    continue
                alpha[:, j, i] = cur + best_d
                exps[:, j, i] = best_e
                step = best_d[:, None] * b                          # ΔŴ on the group's columns
                grad -= step @ hd[cols, :]
    return exps


def objective(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    """Relative calibrated output error sqrt(tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ)) (undamped H)."""
    from .weighted import relative_error
    return relative_error(w, approx, h)


# ---- the affine code (rewriter/bcq.py) -------------------------------------------------------------------------------
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def affine_values(scales: torch.Tensor, offsets: torch.Tensor, q: int) -> torch.Tensor:
    """(out, G) scales and offsets -> every grid value (out, G, 2^q): s·(L − (2^q − 1)/2) + β, L = 0 … 2^q − 1."""
    centred = torch.arange(2 ** q, device=scales.device, dtype=torch.float32) - (2 ** q - 1) / 2
    return scales[..., None] * centred + offsets[..., None]


def affine_nearest(wg: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, q: int) -> torch.Tensor:
    """wg (out, G, g) -> the level (out, G, g) int64 of each weight's nearest grid value."""
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)[..., None]
    level = ((wg - offsets[..., None]) / safe + (2 ** q - 1) / 2).round().clamp(0, 2 ** q - 1)
    return torch.where(scales[..., None] == 0, torch.zeros_like(level), level).long()


def affine_dequant(scales: torch.Tensor, offsets: torch.Tensor, levels: torch.Tensor, q: int) -> torch.Tensor:
    """(out, G), (out, G), levels (out, G, g) -> float32 W (out, G·g)."""
    w = scales[..., None] * (levels.float() - (2 ** q - 1) / 2) + offsets[..., None]
    return w.reshape(w.shape[0], -1)


def _inverse_factor(hd: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """U = chol((P·H·Pᵀ)⁻¹)ᵀ in float32 for the damped Gram `hd` (n, n) float64, which this function owns: at most
    two n×n float64 matrices live at once (0.5 GB for a 5632-wide layer; an expression of the three steps held
    four plus the caller's copy)."""
    hd = hd[perm]
    hd = hd[:, perm]
    hd = torch.linalg.cholesky(hd)
    hd = torch.cholesky_inverse(hd)
    hd = torch.linalg.cholesky(hd, upper=True)
    return hd.float()


def _group_range(w: torch.Tensor, group: int):
    """(grouped W (out, G, g), valid (G, g) — False on padding —, min and max of each group (out, G))."""
    wg = grouped(w, group)
    valid = grouped(torch.ones(1, w.shape[1], device=w.device), group)[0] > 0
    return wg, valid, torch.where(valid, wg, torch.inf).amin(-1), torch.where(valid, wg, -torch.inf).amax(-1)


def _padded_gram(h: torch.Tensor, n: int, damp: float = 0.0) -> torch.Tensor:
    """H (in, in) (+ damp·mean diag on its diagonal) zero-padded to (n, n) float64: padding does not count."""
    hp = torch.zeros(n, n, dtype=torch.float64, device=h.device)
    k = h.shape[0]
    hp[:k, :k] = h                                                 # converted in place: no float64 temporary
    if damp:
        hp.diagonal()[:k] = damped_diagonal(h, k, damp)
    return hp


def stored(values: torch.Tensor, signed: bool, dtype: torch.dtype, scale_bits: int = 0) -> torch.Tensor:
    """What the affine code can store nearest to per-group scales (signed=False: ≥ 0) or offsets, as float32: the
    values rounded to `dtype`, or — scale_bits > 0 — coded with that many bits under one `dtype` step per 8 groups
    of a row (rewriter/group_codes.py; rows are coded independently)."""
    if scale_bits:
        return group_codes.round_trip(values, scale_bits, signed, dtype)
    return values.to(dtype).float()


def affine_grid(w: torch.Tensor, q: int, group: int, importance: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float16, scale_bits: int = 0):
    """The uniform grid of every (row, group), as stored (`stored`): (scales, offsets) (out, G) float32. The min/max
    range (padding excluded) is shrunk about its centre by the ratio of CLIP_RATIOS with the least squared rounding
    error, weighted by the columns' `importance` (diag of the Gram) when given; ratio 1 is round-to-nearest's. The
    search rounds to `dtype`; coded scales (scale_bits > 0) are coded once, after it."""
    in_f = w.shape[1]
    wg, valid, lo, hi = _group_range(w, group)
    weight = valid.float() if importance is None else grouped(importance[None, :in_f], group)[0] * valid
    best = None
    for ratio in CLIP_RATIOS:
        scales = ((hi - lo) * ratio / (2 ** q - 1)).to(dtype).float()
        offsets = ((hi + lo) / 2).to(dtype).float()
        levels = affine_nearest(wg, scales, offsets, q)
        err = ((wg - affine_dequant(scales, offsets, levels, q).view_as(wg)).square() * weight).sum(-1)
        if best is None:
            best = (scales, offsets, err)
        else:
            better = err < best[2]
            best = tuple(torch.where(better, a, b) for a, b in zip((scales, offsets, err), best))
    if scale_bits:
        return stored(best[0], False, dtype, scale_bits), stored(best[1], True, dtype, scale_bits)
    return best[0], best[1]


def _row_objective(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Per row (w − ŵ)·H·(w − ŵ)ᵀ, (out,) float64 — rows are independent in tr(ΔW·H·ΔWᵀ); `rows` at a time, so
    the float64 temporaries stay small whatever the layer's height."""
    hd = h.double()
    parts = []
    for r0 in range(0, w.shape[0], rows):
        d = w[r0:r0 + rows].double() - approx[r0:r0 + rows].double()
        parts.append(((d @ hd) * d).sum(-1))
    return torch.cat(parts)


def refit_affine(w: torch.Tensor, h: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor, q: int, damp: float = AFFINE_DAMP, ridge: float = 1e-9,
                 dtype: torch.dtype = torch.float16, scale_bits: int = 0):
    """With the levels fixed, Ŵ[r] is linear in the row's 2G unknowns (s, β): solve the normal equations of
    min (w_r − Ŵ_r)·H·(w_r − Ŵ_r)ᵀ for every row exactly (float64, padding not counted, H damped as in the error
    feedback: without it the directions the calibration data never excites — a LayerNorm's output has one —
    let the weights drift far from W for a negligible gain), round to `dtype` and keep, per row, whichever of the
    old and new (s, β) has the lower (damped) error. With c = L − (2^q−1)/2 and blocks j, k of
    columns, the system is  [Σ_{a∈j,b∈k} c_a H_ab c_b, Σ c_a H_ab ; Σ H_ab c_b, Σ H_ab]·[s; β] = [Σ_{a∈j} c_a (Hw)_a;
    Σ_{a∈j} (Hw)_a], built through T[a, k] = Σ_{b∈k} H_ab c_b without forming a dense design matrix. The solution
    is then stored as the code stores it (`stored`: fp16, or integer codes) before the per-row comparison."""
    out_f, groups, g = levels.shape
    n = groups * g
    in_f = w.shape[1]
    hp = _padded_gram(h, n, damp)
    hg = hp.view(n, groups, g)
    u = hg.sum(-1)                                                        # U[a, k] = Σ_{b∈k} H_ab
    bb = u.view(groups, g, groups).sum(1)                                 # (G, G)
    target = torch.nn.functional.pad(w, (0, n - in_f))
    new_s, new_b = scales.clone(), offsets.clone()
    rows = max(1, (1 << 24) // (n * groups))
    eye = torch.eye(2 * groups, dtype=torch.float64, device=w.device)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        c = levels[r0:r1].double() - (2 ** q - 1) / 2                     # (R, G, g)
        t = torch.einsum("akb,rkb->rak", hg, c).view(r1 - r0, groups, g, groups)
        ss = torch.einsum("rja,rjak->rjk", c, t)
        sb = torch.einsum("rja,jak->rjk", c, u.view(groups, g, groups))
        hw = (target[r0:r1].double() @ hp).view(r1 - r0, groups, g)
        rhs = torch.cat([(c * hw).sum(-1), hw.sum(-1)], -1)
        m = torch.cat([torch.cat([ss, sb], -1), torch.cat([sb.transpose(1, 2), bb.expand_as(ss)], -1)], 1)
        scale = m.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        theta = torch.linalg.solve(m + (ridge * scale)[:, None, None] * eye, rhs[..., None])[..., 0]
        new_s[r0:r1] = theta[:, :groups].float()
        new_b[r0:r1] = theta[:, groups:].float()
    new_s, new_b = stored(new_s, False, dtype, scale_bits), stored(new_b, True, dtype, scale_bits)
    old = _row_objective(target, affine_dequant(scales, offsets, levels, q), hp)
    new = _row_objective(target, affine_dequant(new_s, new_b, levels, q), hp)
    finite = torch.isfinite(new_s).all(-1) & torch.isfinite(new_b).all(-1)
    keep_new = ((new < old) & finite)[:, None]
    return torch.where(keep_new, new_s, scales), torch.where(keep_new, new_b, offsets)


def quantize_affine(w: torch.Tensor, q: int, group: int, h: torch.Tensor | None = None, damp: float = AFFINE_DAMP,
                    refit: int = 1, dtype: torch.dtype = torch.float16, scale_bits: int = 0):
    """The affine code of W (out, in): (scales, offsets) (out, G) float32 holding values of `dtype` (fp16, or bf16
    for a bf16 model: its range), levels (out, G, g) int64.

    Data-free: the clip-searched grid and nearest levels. Calibrated: the grid (columns weighted by diag H), GPTQ
    error feedback over it (`error_feedback`), then (`refit` > 0) the exact least-squares refit of s and β; per row,
    the result is replaced by round-to-nearest's (grid ratio 1, nearest levels) wherever that has the lower
    calibrated error — so no row, hence no layer, is worse than round-to-nearest on the calibration data.
    scale_bits > 0: scales and offsets are coded with that many bits (rewriter/group_codes.py) at every step, and
    the round-to-nearest compared with is coded the same way (same bits per weight)."""
    out_f, in_f = w.shape
    wg = grouped(w, group)
    groups, g = wg.shape[1], wg.shape[2]
    if h is None:
        scales, offsets = affine_grid(w, q, group, dtype=dtype, scale_bits=scale_bits)
        return scales, offsets, affine_nearest(wg, scales, offsets, q)
    n = groups * g
    importance = damped_diagonal(h, n, damp).float()
    importance[in_f:] = 0
    scales, offsets = affine_grid(w, q, group, importance, dtype, scale_bits)
    pattern = error_feedback(wg.reshape(out_f, n).clone(), h, damp, importance, affine_values(scales, offsets, q),
                             group)
    levels = pattern.view(out_f, groups, g)
    if refit:
        scales, offsets = refit_affine(w, h, levels, scales, offsets, q, damp, dtype=dtype, scale_bits=scale_bits)
    # round-to-nearest's own grid and levels, kept per row where they do better on the calibration data
    wp, hp = wg.reshape(out_f, n), _padded_gram(h, n)
    r_s, r_b, r_levels = rtn_affine(w, q, group, dtype, scale_bits)
    ours = _row_objective(wp, affine_dequant(scales, offsets, levels, q), hp)
    theirs = _row_objective(wp, affine_dequant(r_s, r_b, r_levels, q), hp)
    use_rtn = theirs < ours
    if bool(use_rtn.any()):
        scales = torch.where(use_rtn[:, None], r_s, scales)
        offsets = torch.where(use_rtn[:, None], r_b, offsets)
        levels = torch.where(use_rtn[:, None, None], r_levels, levels)
    return scales, offsets, levels


# ---- round-to-nearest baseline ------------------------------------------------------------------------------------
def rtn(w: torch.Tensor, bits: int, group: int, dtype: torch.dtype = torch.float16, scale_bits: int = 0
        ) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest per group (scale and range midpoint rounded to fp16, or `dtype`, or coded
    with `scale_bits` bits per value), dequantised (out, in) — the affine code's grid at clip ratio 1 with nearest
    levels."""
    scales, offsets, levels = rtn_affine(w, bits, group, dtype, scale_bits)
    return affine_dequant(scales, offsets, levels, bits)[:, : w.shape[1]]


def rtn_affine(w: torch.Tensor, bits: int, group: int, dtype: torch.dtype = torch.float16, scale_bits: int = 0):
    """Round-to-nearest in the affine code's terms: (scales, offsets) (out, G), levels (out, G, g)."""
    wg, _, lo, hi = _group_range(w, group)
    scales = stored((hi - lo) / (2 ** bits - 1), False, dtype, scale_bits)
    offsets = stored((hi + lo) / 2, True, dtype, scale_bits)
    return scales, offsets, affine_nearest(wg, scales, offsets, bits)


def rtn_bits_per_weight(bits: int, group: int, scale_bits: int = 0) -> float:
    return bits + (group_codes.bits_per_weight(scale_bits, group) if scale_bits else 32 / group)


def rtn_group(bits: int, group: int, terms: int) -> int:
    """The RTN group size with the same (or, when not a whole number, at least as many) bits per weight as BCQ
    with `bits` planes, `group` and `terms`: bits + 32/g_rtn = bits + 8·bits·terms/group."""
    return max(1, (4 * group) // (bits * terms))
