"""`structured` — per layer, the cheapest structured form whose error stays under one bound, to hit a budget.

Candidates per matched linear W (m × n), each initialised by its optimal projection (rewriter/projections.py):

    monarch     b ∈ {4, 8, 16}                 q·(b·p + b·s) params  (≈ 2mn/b square)
    blockdense  b = 4, inner width for ≈ 25 % / 50 % of m·n params
    blockdiag   plain, b ∈ {2, 4}              ≈ m·n/b params
    lowrank     r for ≈ 12.5 % / 25 % / 50 % of m·n params
    dense       m·n params, error 0 (always allowed)

Calibrated (calibrate=N > 0, the default): every candidate is fitted to minimise its output error on N calibration
samples of `data` (rewriter/weighted.py) and ranked by that calibrated output error, √(tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ))
with the layer's input Gram H. Data-free (calibrate=0): Frobenius-optimal candidates ranked by metric=output
(the same measure on the example inputs' Gram) or metric=weight (‖W − W'‖/‖W‖).
For a bound ε every layer takes its cheapest candidate with error ≤ ε; the total parameter count
of the matched layers falls as ε grows, so the pass picks the smallest ε (over the measured errors) whose total is
≤ budget · (dense total). If even the cheapest forms miss the budget, it takes them and says so.
The budget left over is then spent greedily: repeatedly upgrade the layer whose next-better candidate removes the
most error per added parameter, while the total stays within budget (a multiple-choice knapsack heuristic; it
never raises any layer's error and never exceeds the budget).
The per-layer choice table is printed through ctx.message and each layer is reported through ctx.site.

Graph, before → after: each chosen layer as in `monarch` / `blockdiag` / `lowrank`
(rewrite.monarch_linear, rewrite.blockdiag_linear, rewrite.lowrank_linear); dense layers are untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rewriter import calibration, weighted
from rewriter.errors import UserError
from rewriter.matchers.linear import LINEAR_OPS
from rewriter.pass_base import Contract, Pass
from rewriter.projections import (PRE_MERGE_TOKENS, Factored, apply, blockdense_project, blockdiag_project,
                                  default_sites, layer_rows, monarch_project, monarch_skip_reason, output_error,
                                  weight_error)

_MONARCH_BLOCKS = (4, 8, 16)
_BLOCKDIAG_BLOCKS = (2, 4)
_BLOCKDENSE_FRACTIONS = (0.25, 0.5)
_LOWRANK_FRACTIONS = (0.125, 0.25, 0.5)


def candidates(w, fit_gram, rank_gram, pad):
    """One layer's candidate table (runs in ctx.map_layers): [(spec, Factored | None, params, error)], dense first.

    Candidates are fitted under `fit_gram` (calibrated) or in Frobenius norm (None), and their error is the
    output error under `rank_gram` (calibration or example-input Gram), else the weight error."""
    m, n = w.shape
    out = []
    for b in _MONARCH_BLOCKS:
        if monarch_skip_reason(m, n, b, pad) is None:
            out.append((f"monarch{{blocks={b}}}", monarch_project(w, b, gram=fit_gram)))
    for b in _BLOCKDIAG_BLOCKS:
        if monarch_skip_reason(m, n, b, pad) is None:
            out.append((f"blockdiag{{form=plain,blocks={b}}}", blockdiag_project(w, b, gram=fit_gram)))
    b = 4
    if monarch_skip_reason(m, n, b, pad) is None:
        for frac in _BLOCKDENSE_FRACTIONS:
            rank = int(frac * m * n / (-(-n // b) + m)) // b * b
            if rank >= b:
                out.append((f"blockdiag{{blocks={b},rank={rank}}}", blockdense_project(w, b, rank, gram=fit_gram)))
    ranks = [r for r in (int(frac * m * n / (m + n)) for frac in _LOWRANK_FRACTIONS) if r >= 1]
    if ranks:
        svd = weighted.whitened_svd(w, fit_gram)            # one SVD for every rank
        for rank in ranks:
            u, v = weighted.cut(svd, min(rank, svd[1].shape[0]))
            work = w.dtype if w.dtype == torch.float64 else torch.float32
            out.append((f"lowrank{{rank={rank}}}", Factored("lowrank", m, n, {"u": u.to(work).to(w.dtype),
                                                                                "v": v.to(work).to(w.dtype)},
                                                            {"rank": rank, "calibrated": fit_gram is not None})))
    table = [("dense", None, w.numel(), 0.0)]
    for spec, fac in out:
        if fac.params >= m * n:
            continue
        approx = fac.dense()
        err = weighted.relative_error(w, approx, rank_gram) if rank_gram is not None else weight_error(w, approx)
        table.append((spec, fac, fac.params, err))
    return table


@dataclass(frozen=True)
class StructuredPass(Pass):
    name = "structured"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = "per-layer choice among monarch / blockdiag / lowrank / dense to meet a parameter budget"
    fuzz_options = {"calibrate": 2}

    budget: float = 0.5
    metric: Literal["output", "weight"] = "output"
    calibrate: int = calibration.DEFAULT_SAMPLES
    data: str = "self"
    seq: int = calibration.DEFAULT_SEQ
    seed: int = 0
    targets: str = ""
    exclude: str = ""
    pad: bool = True
    pre_merge: bool = False
    pre_merge_tokens: int = PRE_MERGE_TOKENS

    def __post_init__(self):
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        calibration.check_options(self.data, self.calibrate, self.seq)

    def run(self, ctx) -> None:
        gm = ctx.gm
        sites = default_sites(gm, self.targets, self.exclude)
        if not sites:
            raise UserError(f'structured: no linear layer matches targets="{self.targets}"')
        acts = ctx.activations([s.x for s in sites])
        spec = calibration.spec_of(self)
        stats = calibration.layer_stats(ctx, spec, sites) if spec.samples > 0 else None
        items = []
        for site in sites:
            w = site.weight_out_in(gm).detach()
            fit_gram = stats.gram(site.name) if stats is not None else None
            rank_gram = fit_gram
            if rank_gram is None and self.metric == "output" and acts.get(site.x) is not None:
                x = acts[site.x].reshape(-1, w.shape[1]).double()
                rank_gram = x.t() @ x / max(1, x.shape[0])
            if self.metric == "weight":
                rank_gram = None
            items.append((w, fit_gram, rank_gram, self.pad))
        tables = ctx.map_layers(candidates, items, "projecting candidates")
        table = [(site, item[0], options) for site, item, options in zip(sites, items, tables)]
        grams = {site.name: item[1] for site, item in zip(sites, items)}

        dense_total = sum(w.numel() for _, w, _ in table)
        target = self.budget * dense_total

        def choose(bound):
            picks = []
            for _, _, options in table:
                ok = [o for o in options if o[3] <= bound]
                picks.append(min(ok, key=lambda o: (o[2], o[3])))
            return picks, sum(p[2] for p in picks)

        bounds = sorted({o[3] for _, _, options in table for o in options})
        picks, total, bound = None, None, None
        for bound in bounds:
            picks, total = choose(bound)
            if total <= target:
                break
        if total <= target:
            picks, total = self._spend_leftover(table, picks, total, target)
        if total > target:
            ctx.message(f"structured: budget {self.budget:g} not reachable; the cheapest forms give "
                        f"{total / dense_total:.3f} of the dense parameters")
        bound = max(p[3] for p in picks)
        lines = [f"structured: budget {self.budget:g} of {dense_total} params -> {total} "
                 f"({total / dense_total:.3f}), max error {bound:.4g} ({'calibrated output' if stats is not None else self.metric})",
                 f"{'layer':<32} {'shape':>11} {'choice':<32} {'params':>9} {'error':>8}"]
        for (site, w, _), (spec, fac, n_params, err) in zip(table, picks):
            m, n = w.shape
            lines.append(f"{site.name:<32} {f'{n}->{m}':>11} {spec:<32} {n_params:>9} {err:>8.4f}")
            if fac is None:
                ctx.site(site.name, "skipped", choice="dense", params_before=w.numel(), params_after=w.numel(),
                         weight_error=0.0, output_error=0.0, reason=f"kept dense (bound {bound:.4g})")
                continue
            rows = layer_rows(site)
            x = acts.get(site.x)
            bias = site.bias_tensor(gm)
            approx = fac.dense()
            apply(gm, site, fac, pass_name=self.name, pre_merge=self.pre_merge_tokens if self.pre_merge else None,
                  calibrated=grams[site.name] is not None)
            dense_path = self.pre_merge and 0 < rows <= self.pre_merge_tokens
            extra = {}
            if grams[site.name] is not None:
                extra["calibrated_error"] = weighted.relative_error(w, approx, grams[site.name])
            ctx.site(site.name, choice=spec, params_before=w.numel(), params_after=fac.params,
                     weight_error=weight_error(w, approx),
                     output_error=output_error(x, w, approx, bias.detach() if bias is not None else None)
                     if x is not None else None, **extra,
                     flops_before=2 * rows * w.numel(),
                     flops_after=2 * rows * w.numel() if dense_path else rows * fac.flops_per_row(), kind=fac.kind)
        ctx.message("\n".join(lines))

    @staticmethod
    def _spend_leftover(table, picks, total, target):
        """Upgrade layers to lower-error candidates, best error drop per added parameter first, within budget."""
        picks = list(picks)
        while True:
            best = None
            for i, (_, _, options) in enumerate(table):
                current = picks[i]
                for option in options:
                    extra, gain = option[2] - current[2], current[3] - option[3]
                    if gain > 0 and total + extra <= target:
                        score = gain / max(extra, 1)
                        if best is None or score > best[0]:
                            best = (score, i, option, extra)
            if best is None:
                return picks, total
            _, i, option, extra = best
            picks[i] = option
            total += extra
