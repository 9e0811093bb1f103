"""`lowrank` — replace linear layers by a product of two thin matrices, the output-optimal truncated SVD.

    W ≈ U·V,   U (m × r), V (r × n)

Calibrated (calibrate=N > 0, the default; SVD-LLM's truncation-aware whitening, Wang et al. 2024): with the layer's
calibration Gram H = XᵀX/rows + λI = L·Lᵀ (rewriter/calibration.py, N samples of `data`),

    W·L = U_w·Σ·V_wᵀ,   U = U_w,r·√Σ_r,   V = √Σ_r·V_w,rᵀ·L⁻¹

minimises the output error ‖X·(W − UV)ᵀ‖ over rank r, and that error is the whitened SVD tail √(Σ_{i>r} σᵢ²/Σσᵢ²).
Data-free (calibrate=0): the plain truncated SVD, U = U_r·√σ, V = √σ·V_rᵀ (Eckart–Young: the least ‖W − UV‖_F).
The rank comes from `rank`, or `ratio` (r·(m+n) ≈ ratio·m·n parameters), or `energy` (smallest r keeping that
fraction of Σσ² — of the output energy when calibrated; the default, 0.95). Layers where the factors would not be
smaller than W are skipped. Reported per layer: weight error, output error on the example inputs, calibrated error.

Graph, before → after:
    y = aten.linear(x, W, b)      →   y = rewrite.lowrank_linear(x, U, V, b, None, 0)
    y = aten.addmm(b, x2d, W_io)  →   same on x2d (GPT-2 Conv1D)
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter import calibration
from rewriter.errors import UserError
from rewriter.matchers.linear import LINEAR_OPS
from rewriter.pass_base import Contract, Pass
from rewriter.projections import PRE_MERGE_TOKENS, default_sites, lowrank_project, project_sites


def fit(w, h, rank, ratio, energy):
    """One layer's projection (runs in ctx.map_layers)."""
    return lowrank_project(w, rank, ratio, energy, gram=h)


@dataclass(frozen=True)
class LowRankPass(Pass):
    name = "lowrank"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = "low-rank U·V linear layers: truncated SVD, calibrated by SVD-LLM whitening"
    fuzz_options = {"calibrate": 2}

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    calibrate: int = calibration.DEFAULT_SAMPLES
    data: str = "self"
    seq: int = calibration.DEFAULT_SEQ
    seed: int = 0
    targets: str = ""
    exclude: str = ""
    pre_merge: bool = False
    pre_merge_tokens: int = PRE_MERGE_TOKENS
    max_error: float | None = None

    def __post_init__(self):
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank, ratio, energy (got {', '.join(given)})")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        calibration.check_options(self.data, self.calibrate, self.seq)

    def run(self, ctx) -> None:
        sites = default_sites(ctx.gm, self.targets, self.exclude)
        if not sites:
            raise UserError(f'lowrank: no linear layer matches targets="{self.targets}"')
        energy = self.energy if self.energy is not None else (
            0.95 if self.rank is None and self.ratio is None else None)
        project_sites(ctx, sites, fit, (self.rank, self.ratio, energy), pass_name=self.name,
                      spec=calibration.spec_of(self), max_error=self.max_error,
                      pre_merge=self.pre_merge_tokens if self.pre_merge else None)
