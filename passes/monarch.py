"""`monarch` — replace linear layers by Monarch matrices (Dao et al. 2022), optimally projected.

    W (m × n)  ≈  M = P₂·L·P₁·R,   R = diag(w1[0..b)) (b blocks q × p),  L = diag(w2[0..b)) (b blocks s × q)

p = ⌈n/b⌉, s = ⌈m/b⌉, q = min(p, s) (HazyResearch/fly `MonarchLinear(nblocks=b)`): q·(b·p + b·s) parameters,
≈ 2·m·n/b for square weights. Initialisation is the analytical Frobenius optimum: each slice W[c::b, k·p:(k+1)·p]
has rank ≤ q/b and the slices share no factor entry, so a truncated SVD per slice (√σ split) is optimal — rank 1 in
the paper's square case b = √n (see rewriter/projections.py). Sizes that b does not divide are handled by
zero-padding the input and truncating the output (pad=true) or skipped with a reason (pad=false).

Graph, before → after (rules "monarch-<matcher rule>"):

    y = aten.linear(x, W, b)        →   y = rewrite.monarch_linear(x, w1, w2, b, m, None, 0)
    y = aten.addmm(b, x2d, W_io)    →   y = rewrite.monarch_linear(x2d, w1, w2, b, m, None, 0)     (GPT-2 Conv1D)

With pre_merge=true the product M is also stored (frozen) and the op uses it when x has ≤ pre_merge_tokens rows.
Contract: approximate; per layer the weight error ‖W − M‖/‖W‖ and the output error on the example inputs are
reported; max_error skips layers whose output error would exceed it. w1, w2 are trainable Parameters.

Calibrated (calibrate=N > 0, the default): the factors minimise the output error on N calibration samples of
`data` instead, tr(ΔW·H·ΔWᵀ) with the layer's input Gram H: row group c (rows c::b) of a Monarch matrix is
w2[c]·diag(w1[0][c::b] … w1[b−1][c::b]), a BlockDense problem solved by alternating exact least squares from the
per-slice whitened SVD (rewriter/weighted.py); an exactly-Monarch W is still recovered exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter import calibration
from rewriter.errors import UserError
from rewriter.matchers.linear import LINEAR_OPS
from rewriter.pass_base import Contract, Pass
from rewriter.projections import PRE_MERGE_TOKENS, default_sites, monarch_project, monarch_skip_reason, project_sites


def fit(w, h, blocks, min_size, pad):
    """One layer's projection (runs in ctx.map_layers): a Factored, or the reason the layer is skipped."""
    m, n = w.shape
    if min(m, n) < min_size:
        return f"layer {n}->{m} is smaller than min_size={min_size}"
    return monarch_skip_reason(m, n, blocks, pad) or monarch_project(w, blocks, gram=h)


@dataclass(frozen=True)
class MonarchPass(Pass):
    name = "monarch"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = "Monarch (two block-diagonal factors) linear layers, optimal (calibrated) projection"
    fuzz_options = {"calibrate": 2}

    blocks: int = 4
    calibrate: int = calibration.DEFAULT_SAMPLES
    data: str = "self"
    seq: int = calibration.DEFAULT_SEQ
    seed: int = 0
    targets: str = ""
    exclude: str = ""
    min_size: int = 0
    pad: bool = True
    pre_merge: bool = False
    pre_merge_tokens: int = PRE_MERGE_TOKENS
    max_error: float | None = None

    def __post_init__(self):
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.min_size < 0 or self.pre_merge_tokens < 0:
            raise ValueError("min_size and pre_merge_tokens must be >= 0")
        calibration.check_options(self.data, self.calibrate, self.seq)

    def run(self, ctx) -> None:
        sites = default_sites(ctx.gm, self.targets, self.exclude)
        if not sites:
            raise UserError(f'monarch: no linear layer matches targets="{self.targets}"')

        project_sites(ctx, sites, fit, (self.blocks, self.min_size, self.pad), pass_name=self.name,
                      spec=calibration.spec_of(self), max_error=self.max_error,
                      pre_merge=self.pre_merge_tokens if self.pre_merge else None)
