"""`blockdiag` — replace linear layers by a block-diagonal matrix, optionally followed by a dense one (BlockDense).

    form=blockdense  W ≈ U_r·V_b,  V_b = diag(V_1 … V_b) (b blocks t × p), U_r (m × b·t)   (StructuredFFN BlockDense)
    form=plain       W ≈ diag(V_1 … V_b)  (b blocks ⌈m/b⌉ × ⌈n/b⌉)

Initialisation minimises ‖W − W'‖_F for the structure:
    blockdense: column block k of U_r·V_b is U_k·V_k (U_k = the k-th t columns of U_r), so each column block
                W[:, k·p:(k+1)·p] independently takes its rank-t truncated SVD, √σ split (Eckart–Young per block);
    plain:      the entries of distinct blocks are independent and off-block entries are always 0, so the optimum
                copies the diagonal blocks of W.
Sizes that b does not divide: zero-padded input, truncated output (pad=true), or skipped (pad=false).
`rank` is the total inner width b·t of BlockDense (default min(m, n)/2).

Graph, before → after:
    y = aten.linear(x, W, b)      →   y = rewrite.blockdiag_linear(x, V_b, U_r | None, b, m, None, 0)
    y = aten.addmm(b, x2d, W_io)  →   same on x2d (GPT-2 Conv1D)

Calibrated (calibrate=N > 0, the default): the factors minimise the output error tr(ΔW·H·ΔWᵀ) on N calibration
samples of `data` (H: the layer's input Gram) instead — BlockDense by alternating exact least squares from the
per-block whitened SVD, plain blocks by the conditional-mean correction w'_S = w_S + w_S̄·H_S̄S·H_SS⁻¹
(rewriter/weighted.py).

Contract: approximate (weight and output errors reported per layer; max_error skips layers above it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rewriter import calibration
from rewriter.errors import UserError
from rewriter.matchers.linear import LINEAR_OPS
from rewriter.pass_base import Contract, Pass
from rewriter.projections import (PRE_MERGE_TOKENS, blockdense_project, blockdiag_project, blockdiag_skip_reason,
                                  default_sites, project_sites)


def fit(w, h, blocks, form, rank, pad):
    """One layer's projection (runs in ctx.map_layers): a Factored, or the reason the layer is skipped."""
    m, n = w.shape
    reason = blockdiag_skip_reason(m, n, blocks, pad)
    if reason:
        return reason
    if form == "plain":
        return blockdiag_project(w, blocks, gram=h)
    return blockdense_project(w, blocks, rank, gram=h)


@dataclass(frozen=True)
class BlockDiagPass(Pass):
    name = "blockdiag"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = "block-diagonal (plain) or block-diagonal then dense (BlockDense) linear layers, optimal (calibrated) init"
    fuzz_options = {"calibrate": 2}

    blocks: int = 4
    form: Literal["blockdense", "plain"] = "blockdense"
    rank: int | None = None
    calibrate: int = calibration.DEFAULT_SAMPLES
    data: str = "self"
    seq: int = calibration.DEFAULT_SEQ
    seed: int = 0
    targets: str = ""
    exclude: str = ""
    pad: bool = True
    pre_merge: bool = False
    pre_merge_tokens: int = PRE_MERGE_TOKENS
    max_error: float | None = None

    def __post_init__(self):
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.rank is not None and self.rank < self.blocks:
            raise ValueError(f"rank (total inner width) must be >= blocks={self.blocks}, got {self.rank}")
        calibration.check_options(self.data, self.calibrate, self.seq)

    def run(self, ctx) -> None:
        sites = default_sites(ctx.gm, self.targets, self.exclude)
        if not sites:
            raise UserError(f'blockdiag: no linear layer matches targets="{self.targets}"')

        project_sites(ctx, sites, fit, (self.blocks, self.form, self.rank, self.pad), pass_name=self.name,
                      spec=calibration.spec_of(self), max_error=self.max_error,
                      pre_merge=self.pre_merge_tokens if self.pre_merge else None)
