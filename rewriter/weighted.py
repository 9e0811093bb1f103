"""Calibrated (data-aware) projections: minimise a layer's output error on calibration data, not ‖W − W'‖_F.

For a layer y = W·x (W: r × n) with calibration rows X, the output error of an approximation W' is

    ‖X·(W − W')ᵀ‖²_F / rows = tr(ΔW·H·ΔWᵀ),      H = XᵀX / rows + λI      (λ = damp · mean diag, damp = 1 %)

so only the Gram H matters (rewriter/calibration.py captures it once per pipeline). With H = L·Lᵀ (Cholesky):

Low rank (SVD-LLM, Wang et al. 2024, truncation-aware whitening): tr(ΔW·H·ΔWᵀ) = ‖(W − W')·L‖²_F, so the best
    rank-r W' is the truncated SVD of W·L mapped back:  W·L = U·Σ·Vᵀ,  W' = U_r·Σ_r·V_rᵀ·L⁻¹,  factors
    U_r·√Σ_r and √Σ_r·V_rᵀ·L⁻¹; the error is exactly the whitened SVD tail √(Σ_{i>r} σᵢ²/Σ σᵢ²) — each truncated
    singular value is a direction of output error, which plain SVD (or ASVD's diagonal scaling) does not give.
BlockDense W' = U·D, D = diag(V_1 … V_b) (b column blocks of width p, V_k: t × p, U: r × b·t): two exact
    least-squares steps alternate, each the minimiser of its block of variables given the others, so the error
    never increases (the best iterate is kept):
        U-step   U = W·H·Dᵀ·(D·H·Dᵀ)⁻¹
        V-step   for each k in turn, with G = (W − U·D)·H:   V_k += (U_kᵀU_k)⁻¹·U_kᵀ·G[:, k]·H_kk⁻¹
    Start: each column block's own whitened SVD under H_kk (exact when H is block-diagonal).
Monarch (layout of rewriter/ops/monarch_linear.py): rows c::b of W' only use w2[c] and the rows c, c+b, … of
    each w1[k], i.e. row group c is a BlockDense problem W[c::b] ≈ w2[c]·diag(V_c0 … V_c,b−1) with t = q/b
    (V_ck = w1[k][c::b]); row groups are independent under tr(ΔW·H·ΔWᵀ) (rows never mix), so each is solved as
    above. (When b does not divide q the Frobenius projection is used.)
Block-diagonal (plain): row i of W' is supported on its column block S only; the optimum keeps W on S and moves
    what H correlates with it there:  w'_S = w_S + w_S̄·H_S̄S·H_SS⁻¹  (the conditional mean), exact.

Everything runs in float64 on the weight's device; zero-padding (sizes b does not divide) gets the mean diagonal.
"""
from __future__ import annotations

import torch

DAMP = 0.01


def damped(h: torch.Tensor, size: int | None = None, damp: float = DAMP) -> torch.Tensor:
    """H (n × n) in float64, padded to size × size (the padding with the mean diagonal), plus λI (λ = damp · mean
    of H's positive diagonal)."""
    n = h.shape[0]
    size = n if size is None else size
    out = torch.zeros(size, size, dtype=torch.float64, device=h.device)
    out[:n, :n] = h                        # converts in place: no second float64 copy of a 5632-wide Gram
    diag = out.diagonal()
    positive = diag[:n][diag[:n] > 0]
    mean = float(positive.mean()) if positive.numel() else 1.0
    diag[n:] = mean                        # padding: no information, any positive weight
    diag += damp * mean
    return out


def cholesky(h: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a (batch of) symmetric positive definite float64 matrices; adds jitter if needed."""
    jitter = 0.0
    scale = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    for _ in range(8):
        hj = h + (jitter * scale)[..., None, None] * eye if jitter else h
        factor, info = torch.linalg.cholesky_ex(hj)
        if not bool((info != 0).any()):
            return factor
        jitter = 1e-8 if not jitter else jitter * 100
    raise RuntimeError("calibration Gram is not positive definite even with jitter")


def _top(a: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-t truncated SVD of (a batch of) matrices: (U_t·√σ, √σ·V_tᵀ, all singular values)."""
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    root = sv[..., :t].sqrt()
    return u[..., :t] * root[..., None, :], root[..., :, None] * vh[..., :t, :], sv


def whitened_lowrank(a: torch.Tensor, chol: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) minimising ‖(A − U·V)·L‖_F over rank t (batched over leading dims): SVD of A·L, V ← V·L⁻¹."""
    left, right, _ = _top(a @ chol, t)
    return left, torch.linalg.solve_triangular(chol, right, upper=False, left=False)


def lowrank(w: torch.Tensor, h: torch.Tensor, choose_rank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM: (U, V, whitened singular values); `choose_rank(singular values) -> r`."""
    svd = whitened_svd(w, h)
    u, v = cut(svd, choose_rank(svd[1]))
    return u, v, svd[1]


ROW_WEIGHT_FLOOR = 1e-3      # row weights below this fraction of their mean are raised to it (D⁻¹ stays finite)


def whitened_svd(w: torch.Tensor, h: torch.Tensor | None, rows: torch.Tensor | None = None) -> tuple:
    """(U, σ, Vᵀ, L, d) of D·W·L with H = L·Lᵀ (damped) and D = diag(d), d = √rows — or without L when `h` is None,
    without D (d = None) when `rows` is None — in float64. Truncating it minimises Σ_i rows_i·(ΔW·H·ΔWᵀ)_ii: the
    output error weighted per output (rows: the output Fisher diagonal, as in Fisher-weighted SVD, Hsu et al. 2022;
    floored at ROW_WEIGHT_FLOOR of its mean)."""
    chol = cholesky(damped(h)) if h is not None else None
    a = w.double() @ chol if chol is not None else w.double()
    d = None
    if rows is not None:
        r = rows.double().to(a.device)
        d = r.clamp_min(ROW_WEIGHT_FLOOR * float(r.mean().clamp_min(1e-300))).sqrt()
        a = d[:, None] * a
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    return u, sv, vh, chol, d


def cut(svd: tuple, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r factors (D⁻¹·U_r·√σ, √σ·V_rᵀ·L⁻¹) of a `whitened_svd`."""
    u, sv, vh, chol, d = svd
    root = sv[:r].sqrt()
    right = root[:, None] * vh[:r]
    if chol is not None:
        right = torch.linalg.solve_triangular(chol, right, upper=False, left=False)
    left = u[:, :r] * root
    return (left / d[:, None] if d is not None else left), right


def relative_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    """sqrt(tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)) with the undamped H (padding of `approx` beyond W's columns ignored)."""
    n = w.shape[1]
    hd = h.double()[:n, :n]
    wd = w.double()                        # once: each float64 copy of a 2048 × 5632 weight is 92 MB
    d = wd - approx.double()[: w.shape[0], :n]
    den = float(((wd @ hd) * wd).sum())
    del wd
    return (max(float(((d @ hd) * d).sum()), 0.0) / den) ** 0.5 if den > 0 else 0.0


def row_errors(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """diag(ΔW·H·ΔWᵀ) (m,) float64: each output's mean squared error under the undamped H (padding of `approx`
    beyond W's shape ignored); its sum is the numerator of relative_error's square."""
    n = w.shape[1]
    d = w.double() - approx.double()[: w.shape[0], :n]
    return ((d @ h.double()[:n, :n]) * d).sum(1).clamp_min(0.0)


def _objective(e: torch.Tensor, h: torch.Tensor) -> float:
    return float(((e @ h) * e).sum())


def blockdense(w: torch.Tensor, h: torch.Tensor, blocks: int, t: int, iters: int = 4
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """W (r × b·p, already padded) ≈ U·diag(V_1 … V_b) under the damped Gram h (b·p × b·p): (U (r × b·t),
    V (b, t, p)) in float64, by alternating exact least squares (see the module docstring)."""
    r, n = w.shape
    b = blocks
    p = n // b
    wd = w.double()
    hb = h.view(b, p, b, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)      # (b, p, p): H_kk
    chol = cholesky(hb)
    left, v = whitened_lowrank(wd.view(r, b, p).permute(1, 0, 2), chol, t)   # (b, r, t), (b, t, p)
    u = left.permute(1, 0, 2).reshape(r, b * t)

    def residual(u_, v_):
        approx = torch.einsum("rkt,ktp->rkp", u_.view(r, b, t), v_).reshape(r, n)
        return wd - approx

    best = (_objective(residual(u, v), h), u.clone(), v.clone())
    eye_t = torch.eye(t, dtype=torch.float64, device=w.device)
    for _ in range(iters):
        # D = diag(V_1 … V_b) (b·t × n) is block diagonal: H·Dᵀ and D·H·Dᵀ block by block (b× fewer flops)
        hd = torch.einsum("nkp,ktp->nkt", h.view(n, b, p), v).reshape(n, b * t)        # H·Dᵀ (n, b·t)
        gram = torch.einsum("ktp,kpj->ktj", v, hd.view(b, p, b * t)).reshape(b * t, b * t)
        gram = gram + 1e-12 * (gram.diagonal().mean().abs() + 1e-300) * torch.eye(
            b * t, dtype=torch.float64, device=w.device)
        u = torch.linalg.solve(gram, (wd @ hd).t()).t()
        g = residual(u, v) @ h                                               # (r, n)
        for k in range(b):
            uk = u[:, k * t:(k + 1) * t]
            m = uk.t() @ uk
            m = m + 1e-12 * (m.diagonal().mean().abs() + 1e-300) * eye_t
            step = torch.linalg.solve(m, uk.t() @ g[:, k * p:(k + 1) * p])    # (t, p)
            dv = torch.cholesky_solve(step.t(), chol[k]).t()                  # step·H_kk⁻¹
            v[k] = v[k] + dv
            g = g - uk @ (dv @ h[k * p:(k + 1) * p, :])
        obj = _objective(residual(u, v), h)
        if obj < best[0]:
            best = (obj, u.clone(), v.clone())
        else:
            break
    return best[1], best[2]


def monarch(w: torch.Tensor, h: torch.Tensor, blocks: int, iters: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Monarch projection: (w1 (b, q, p), w2 (b, s, q)) in float64. Needs q % b == 0."""
    m, n = w.shape
    b = blocks
    p, s = -(-n // b), -(-m // b)
    q = min(p, s)
    t = q // b
    wx = torch.zeros(b * s, b * p, dtype=torch.float64, device=w.device)
    wx[:m, :n] = w.double()
    hx = damped(h, b * p)
    w1 = torch.zeros(b, q, p, dtype=torch.float64, device=w.device)
    w2 = torch.zeros(b, s, q, dtype=torch.float64, device=w.device)
    rows = wx.view(s, b, b * p)                                              # [s', c, :] = W[s'·b + c, :]
    for c in range(b):
        u, v = blockdense(rows[:, c, :], hx, b, t, iters)                    # (s, b·t), (b, t, p)
        w2[c] = u
        w1.view(b, t, b, p)[:, :, c, :] = v                                  # w1[k][j·b + c] = V_ck[j]
    return w1, w2


def blockdiag_plain(w: torch.Tensor, h: torch.Tensor, blocks: int) -> torch.Tensor:
    """Weighted plain block-diagonal projection: blocks (b, t, p) in float64 (the conditional-mean correction)."""
    m, n = w.shape
    b = blocks
    p, t = -(-n // b), -(-m // b)
    wx = torch.zeros(b * t, b * p, dtype=torch.float64, device=w.device)
    wx[:m, :n] = w.double()
    hx = damped(h, b * p)
    out = torch.zeros(b, t, p, dtype=torch.float64, device=w.device)
    for k in range(b):
        cols = slice(k * p, (k + 1) * p)
        rows = wx[k * t:(k + 1) * t]
        other = torch.ones(b * p, dtype=torch.bool, device=w.device)
        other[cols] = False
        # w'_S = w_S + w_S̄·H_S̄S·H_SS⁻¹
        corr = torch.linalg.solve(hx[cols, cols], (rows[:, other] @ hx[other][:, cols]).t()).t()
        out[k] = rows[:, cols] + corr
    return out
