"""`lowrank` — replace linear layers by a product of two thin matrices from the truncated SVD.

    W ≈ U·V,   W = U_r·diag(σ)·V_rᵀ + tail,   U = U_r·√σ (m × r),  V = √σ·V_rᵀ (r × n)

Eckart–Young: the relative Frobenius error is the SVD tail √(Σ_{i>r} σᵢ²)/‖W‖, the least any rank-r matrix has.
The rank comes from `rank`, or `ratio` (r·(m+n) ≈ ratio·m·n parameters), or `energy` (smallest r keeping that
fraction of Σσ²; the default, 0.95). Layers where the factors would not be smaller than W are skipped.

Data-aware (calibrate=N > 0, ASVD/FWSVD style): with X = the layer's input on the example inputs (first N rows),
minimise ‖(W − UV)·Xᵀ‖_F: S = (XᵀX/N + λI)^{1/2}, truncated SVD of W·S, V ← V·S⁻¹ (rewriter/projections.py).
Both the weight error and the output error are reported either way.

Graph, before → after:
    y = aten.linear(x, W, b)      →   y = rewrite.lowrank_linear(x, U, V, b, None, 0)
    y = aten.addmm(b, x2d, W_io)  →   same on x2d (GPT-2 Conv1D)
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter.errors import UserError
from rewriter.matchers.linear import LINEAR_OPS
from rewriter.pass_base import Contract, Pass
from rewriter.projections import PRE_MERGE_TOKENS, default_sites, lowrank_project, project_sites


@dataclass(frozen=True)
class LowRankPass(Pass):
    name = "lowrank"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = "low-rank U·V linear layers from the truncated SVD (optionally activation-weighted)"

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    calibrate: int = 0
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
        if self.calibrate < 0:
            raise ValueError("calibrate must be >= 0")

    def run(self, ctx) -> None:
        sites = default_sites(ctx.gm, self.targets, self.exclude)
        if not sites:
            raise UserError(f'lowrank: no linear layer matches targets="{self.targets}"')
        energy = self.energy if (self.rank is None and self.ratio is None and self.energy is not None) else (
            0.95 if self.rank is None and self.ratio is None else None)

        def project(site, w, x):
            calib = None
            if self.calibrate:
                if x is None:
                    return "calibrate: no activations for this layer's input"
                calib = x.reshape(-1, x.shape[-1])[: self.calibrate]
            return lowrank_project(w, self.rank, self.ratio, energy, activations=calib)

        project_sites(ctx, sites, project, pass_name=self.name, max_error=self.max_error,
                      pre_merge=self.pre_merge_tokens if self.pre_merge else None)
