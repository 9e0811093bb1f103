"""Deterministic k-means: k-means++ seeding, then a fixed number of Lloyd iterations.

    seeding   c₀ = a row drawn uniformly; then each next centre is a row drawn with probability ∝ D(x)², the
              squared distance to its nearest centre so far (Arthur & Vassilvitskii 2007). Distances come from
              ‖x‖² − 2x·c + ‖c‖², recomputed as Σ(x − c)² where that is near 0, so a row equal to a centre has
              D = 0 exactly and is never drawn again: with exactly K distinct rows the K seeds are those rows.
              When every remaining D is 0 (fewer distinct rows than k) the next seed is the first row not yet
              used as a seed (duplicate centres; Lloyd leaves one of them empty).
    Lloyd     assign every row to its nearest centre (ties → lowest index), then move each centre to the mean of
              its rows (in float64, so the mean of identical rows is that row exactly); an empty centre keeps
              its place. Stops early once the labels no longer change (later iterations would be no-ops).
Weighted (`weight`, one w_i ≥ 0 per row): the objective is Σᵢ wᵢ·‖xᵢ − c(i)‖²; seeding draws with probability
∝ wᵢ·D(xᵢ)² and centres move to the weighted mean of their rows (assignment is unchanged: nearest centre).
Same (x, k, iters, seed, weight) → same result: all randomness comes from one CPU torch.Generator seeded with `seed`
(the draws are made on the CPU whatever device x lives on, so a model on a GPU gets the same seeds).
"""
from __future__ import annotations

import torch


def _sq_dist_to(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """Squared distance (float64) of every row of x (n, d) to one centre c (d,), exactly 0 for rows equal to c.

    ‖x‖² − 2x·c + ‖c‖² (one matrix-vector product); where that is within rounding of 0 the rows are compared
    with c directly, so duplicates of c get exactly 0 and distinct rows keep a positive distance."""
    d = (x_sq - 2 * (x @ c).double() + c.double().pow(2).sum()).clamp_min(0)
    near = (d <= 1e-5 * (x_sq + 1e-30)).nonzero()[:, 0]
    if near.numel():
        d[near] = (x[near].double() - c.double()).pow(2).sum(-1)
    return d


def seed_centres(x: torch.Tensor, k: int, generator: torch.Generator,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++: indices (k,) of the rows chosen as initial centres (draws ∝ weight·D² when weighted)."""
    n = x.shape[0]
    if weight is not None and float(weight.sum()) > 0:
        first = int(torch.multinomial((weight.double() / weight.double().sum()).to(generator.device), 1,
                                      generator=generator))
    else:
        first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    chosen = [first]
    used = torch.zeros(n, dtype=torch.bool, device=x.device)
    used[first] = True
    x_sq = x.double().pow(2).sum(-1)
    d2 = _sq_dist_to(x, x[first], x_sq)
    for _ in range(1, k):
        score = d2 * weight.double() if weight is not None else d2
        total = score.sum()
        if total > 0:
            nxt = int(torch.multinomial((score / total).to(generator.device), 1, generator=generator))
        else:
            nxt = int((~used).nonzero()[0]) if (~used).any() else 0
        chosen.append(nxt)
        used[nxt] = True
        d2 = torch.minimum(d2, _sq_dist_to(x, x[nxt], x_sq))
    return torch.tensor(chosen, device=x.device)


def assign(x: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centre for every row (ties → lowest index).

    Distances come from ‖x‖² − 2x·c + ‖c‖² in x's precision (one matrix product), whose rounding error is about
    ε·(‖x‖² + ‖c‖²): two centres closer than that to a row cannot be told apart that way. For those rows the
    candidate centres within the error bound of the best are compared by Σ(x − c)² in float64 instead, so a row
    equal to a centre always goes to it and nearby distinct rows are never merged by rounding."""
    c_sq = centres.pow(2).sum(-1)
    eps = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
    out = []
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk]
        x_sq = xs.pow(2).sum(-1, keepdim=True)
        d = x_sq - 2 * xs @ centres.t() + c_sq
        best, labels = d.min(-1)
        tol = 16 * eps * (x_sq[:, 0] + c_sq.max())
        candidates = d <= (best + tol)[:, None]
        ambiguous = candidates.sum(-1) > 1
        if ambiguous.any():
            rows = ambiguous.nonzero()[:, 0]
            r, c = candidates[rows].nonzero().unbind(-1)
            exact = torch.full((rows.numel(), centres.shape[0]), float("inf"), dtype=torch.float64,
                               device=x.device)
            exact[r, c] = (xs[rows[r]].double() - centres[c].double()).pow(2).sum(-1)
            labels[rows] = exact.argmin(-1)
        out.append(labels)
    return torch.cat(out)


def update(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Centres moved to the (weighted) mean of their rows (float64 sums); empty ones stay."""
    k = centres.shape[0]
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weight is None else weight.double()
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels,
                                                                                       x.double() * w[:, None])
    mass = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, labels, w)
    means = (sums / torch.where(mass > 0, mass, torch.ones_like(mass))[:, None]).to(centres.dtype)
    return torch.where((mass > 0)[:, None], means, centres)


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0,
           weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (k, d) in x's dtype, labels (n,) int64) for rows x (n, d); deterministic in `seed`; `weight` (n,)
    weights the rows (module docstring)."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in 1..{x.shape[0]} (the number of rows), got {k}")
    xf = x.detach().float()
    gen = torch.Generator(device="cpu").manual_seed(seed)   # drawn on the CPU: the same codebook on every device
    centres = xf[seed_centres(xf, k, gen, weight)].clone()
    labels = assign(xf, centres)
    for _ in range(iters):
        centres = update(xf, labels, centres, weight)
        new_labels = assign(xf, centres)
        if torch.equal(new_labels, labels):   # converged: further iterations change nothing
            break
        labels = new_labels
    else:
        centres = update(xf, labels, centres, weight)  # centres = means of the final labels
    return centres.to(x.dtype), labels
