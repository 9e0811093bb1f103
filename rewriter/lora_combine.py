"""Weighted combinations of LoRA adapters (the methods of PEFT's `add_weighted_adapter`), as tensor math.

Adapter k on a layer: A_k (r_k, in), B_k (out, r_k), scale s_k; user weight w_k. The result is one adapter (A, B)
with scale 1.

    cat       A = [w₁s₁A₁; w₂s₂A₂; …] (rows stacked),  B = [B₁ B₂ …]       → B·A = Σ w_k·s_k·B_k·A_k exactly; rank Σ r_k
    svd       Δ = Σ w_k·s_k·B_k·A_k;  Δ = U·S·Vᵀ;  B = U_r·S_r,  A = V_rᵀ   (rank r: best rank-r Δ, Eckart–Young);
              `clamp` q clips B and A to ±(the q-quantile of their entries), as kohya's svd_merge_lora
    linear, ties, dare_linear, dare_ties, magnitude_prune (equal ranks): the A's and the B's are merged separately,
              as task vectors, with weights √|w_k s_k|·sign(w_k s_k) on the A's and √|w_k s_k| on the B's (so a
              single adapter comes back as √(ws)·A, √(ws)·B: its product w·s·B·A)

Task-vector merges of tensors t_k with weights λ_k (TIES-Merging, Yadav et al. 2023; DARE, Yu et al. 2023):
    task arithmetic    Σ λ_k·t_k
    magnitude_prune    Σ λ_k·trim(t_k)                trim: keep the ⌊density·numel⌋ entries largest in |·|, zero the rest
    ties               t̂_k = trim(t_k); elect γ = sign(Σ_k t̂_k) ("total") or sign(Σ_k sign(t̂_k)) ("frequency"),
                       γ = +1 where that sum is 0; disjoint mean: Σ_k λ_k·t̂_k·[sign t̂_k = γ] / max(#{k: sign t̂_k = γ}, 1)
    dare_linear        Σ λ_k·drop(t_k)                drop: keep each entry with probability density, divide by density
    dare_ties          ties with drop in place of trim
density ≥ 1 keeps everything. The sign is elected on the pruned tensors before weighting, as PEFT does.

DARE's masks are Bernoulli draws, taken in this order: per layer, the A's of the adapters in order, then the B's —
each `torch.bernoulli(full_like(t, density))` in t's dtype from one generator (the pass seeds it: `seed`). That is
PEFT's order of draws from the global generator, so the same draws give the same result; tests hand PEFT's recorded
masks to `combine` (`draw=`) and compare.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·numel⌋ entries of largest magnitude (TIES' trim; PEFT's magnitude_based_pruning)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = True
    return t * keep.reshape(t.shape)


def drop(t: torch.Tensor, density: float, mask: torch.Tensor | None) -> torch.Tensor:
    """DARE: t·mask / density (mask: Bernoulli(density) entries, drawn by the caller)."""
    if density >= 1:
        return t
    return t * mask.to(t.dtype) / density


def elect(stacked: torch.Tensor, majority: str) -> torch.Tensor:
    """The elected sign per entry (+1 where the sum is 0) of the (k, …) stack of pruned task tensors."""
    total = stacked.sum(0) if majority == "total" else stacked.sign().sum(0)
    return torch.where(total >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, majority: str) -> torch.Tensor:
    agree = stacked.sign() == elect(stacked, majority)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_tensors(method: str, tensors: list[torch.Tensor], weights: list[float], density: float, majority: str,
                  draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One task-vector merge (module docstring) in float64."""
    w = torch.tensor(weights, dtype=torch.float64, device=tensors[0].device)
    if method.startswith("dare"):
        masks = [draw(t) if density < 1 else None for t in tensors]   # drawn in t's dtype, in order
        parts = [drop(t.double(), density, m) for t, m in zip(tensors, masks)]
    elif method in ("ties", "magnitude_prune"):
        parts = [trim(t.double(), density) for t in tensors]
    else:
        parts = [t.double() for t in tensors]
    stacked = torch.stack(parts)
    if method in ("ties", "dare_ties"):
        return disjoint_mean(stacked, w, majority)
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(0)


def combine(method: str, adapters: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float], *,
            density: float = 1.0, rank: int = 0, clamp: float = 0.0, majority: str = "total",
            draw: Callable[[torch.Tensor], torch.Tensor] | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined adapter (scale 1) in the adapters' dtype; see the module docstring.

    adapters: [(A_k, B_k, s_k)]; draw(t): DARE's Bernoulli mask for t (default: from `generator`)."""
    if method not in METHODS:
        raise ValueError(f"unknown combination method {method!r}")
    dtype = adapters[0][0].dtype
    if len(adapters) == 1:
        method = "linear"                      # one adapter: every method reduces to scaling it (as PEFT does)
    if method == "cat":
        a = torch.cat([ak.double() * (w * s) for (ak, _, s), w in zip(adapters, weights)])
        b = torch.cat([bk.double() for _, bk, _ in adapters], dim=1)
        return a.to(dtype), b.to(dtype)
    if method == "svd":
        d = sum((bk.double() @ ak.double()) * (w * s) for (ak, bk, s), w in zip(adapters, weights))
        r = min(rank or max(ak.shape[0] for ak, _, _ in adapters), *d.shape)
        u, sv, vh = torch.linalg.svd(d, full_matrices=False)
        b, a = u[:, :r] * sv[:r], vh[:r]
        if clamp:
            hi = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
            b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
        return a.to(dtype), b.to(dtype)
    if len({ak.shape[0] for ak, _, _ in adapters}) != 1:
        raise ValueError(f"method {method} needs adapters of one rank (got ranks "
                         f"{sorted({ak.shape[0] for ak, _, _ in adapters})}); use cat or svd")
    if draw is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        draw = lambda t: torch.bernoulli(torch.full_like(t, density, device="cpu"), generator=gen).to(t.device)  # noqa: E731
    root = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(adapters, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(adapters, weights)]
    a = merge_tensors(method, [ak for ak, _, _ in adapters], [r * g for r, g in zip(root, signs)], density,
                      majority, draw)
    b = merge_tensors(method, [bk for _, bk, _ in adapters], root, density, majority, draw)
    return a.to(dtype), b.to(dtype)
