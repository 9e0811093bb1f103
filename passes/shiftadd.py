"""`shiftadd` — binary-coded weights combined by shifts and adds (ShiftAddLLM, You et al. 2024; LUT-GEMM).

Each matched weight W (out, in) becomes, per row r and group j of `group` input columns, q sign planes
Bᵢ ∈ {±1}^group (packed 8 per uint8) and one of two codes (rewriter/bcq.py):

    affine (default)  W[r, group j] ≈ s·Σᵢ 2^{i−1}·Bᵢ + β       s, β per (row, group)
                      = the asymmetric uniform grid with 2^q levels. The planes combine by shifts; per (row, group)
                      one multiply by s and one of the input's group sum by β. s and β are stored as `scale_bits`-bit
                      codes under one fp16 step per 8 groups (default 6 bits, group 32: bits + 0.5 bits per weight,
                      4.5 at bits=4 — the layout of llama.cpp's Q4_K; rewriter/group_codes.py, decoded in the program
                      by `rewrite::group_values`), or with scale_bits=0 in fp16 (bits + 32/group: at group=64
                      round-to-nearest's 4.5 bits with an fp16 scale and zero point, the default before).
    pow2              W[r, group j] ≈ Σᵢ αᵢ·Bᵢ,  αᵢ = Σₜ 2^{eᵢₜ} (terms t < `terms`; int8 exponents): no multiply at
                      all; bits per weight = bits + 8·bits·terms/group (4.5 at bits=4, group=64, terms=1).

Why affine is the default: its family contains round-to-nearest's grid, so a fit of it is never worse than
round-to-nearest at equal bits; the pow2 code's power-of-two scales and missing zero point cost more than its
free per-plane scales gain. Measured per layer on SmolLM2 at 4 bits, held-out text (python -m bench.quant_layers):
the README's "Where shiftadd's 4 bits stand". Why coded scales at group 32 by default: for the same bits per weight
as fp16 scales at group 64, each grid follows half as many weights (README, "Where shiftadd's 4 bits stand").

Fit (rewriter/bcq_fit.py), calibrated (calibrate=N > 0, the default; N samples of `data`, H = the layer's input
Gram): affine — the per-group grid (min/max range, clip ratio searched), GPTQ error feedback in act-order over it,
then the exact least-squares refit of every row's scales and offsets under H (each step rounded to what the codes
hold), and per row round-to-nearest (coded alike) wherever that is better on the calibration data. pow2 — every group's grid fitted (uniform and greedy starts,
`rounds` of alternating least squares, an exact search over the power-of-two snappings), GPTQ error feedback, and
a coordinate-descent refit of the scales (`refit` sweeps). Data-free (calibrate=0): the grid fit and nearest values.
Per layer the report has weight_error (‖W − Ŵ‖/‖W‖), output_error (‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ on the example inputs),
calibrated_error (the same on the calibration data) and rtn_error: that of asymmetric round-to-nearest with the
same bits per weight (rewriter/bcq_fit.rtn — the baseline shiftadd must not lose to). pow2: a layer whose fit loses
is refitted with k× more terms per scale over k× larger groups (same bits per weight; `refitted_as` says which was
kept); `worse_than_rtn` marks a layer that still loses; bits_per_weight, bytes before/after; a message gives
the model's memory before/after and how many layers beat round-to-nearest.

Graph, before → after (rule "bcq-<matcher rule>"):

    y = aten.linear(x, W, b)        y = rewrite.shiftadd_linear(x, signs, exponents, b, in_features, group
    y = aten.addmm(b, x, W_io)                                      [, scales, offsets])      (affine: scales, offsets)
                                    scales = rewrite.group_values(scales_codes, scales_steps, groups, 6, False)
                                    offsets = rewrite.group_values(offsets_codes, offsets_steps, groups, 6, True)
                                                                  (coded scales; with scale_bits=0 fp16 tensors)

W is removed (unless another op still reads it, e.g. a tied embedding).

Options:
    code       "affine" (default) or "pow2" (above)
    bits       sign planes per weight (1–8; ShiftAddLLM uses 2–4)
    group      input columns sharing one scale (and offset) per row (multiple of 8; default 32)
    scale_bits affine: bits of each coded scale and offset (2–8, default 6), 0 = fp16 (bf16 for a bf16 model)
    rounds     pow2: alternating least-squares rounds of each grid fit (0 = best of the uniform/greedy starts)
    terms      pow2: powers of two summed per α (1 = a single shift)
    refit      pow2: scale-refit sweeps after the error feedback; affine: 0 skips the least-squares refit
    calibrate / data / seq / seed   calibration samples and where they come from (rewriter/calibration.py)
    budget     average bits per weight (2–4): bits chosen per layer, from each layer's output error at 2/3/4 bits
               (calibrated, or on the example inputs), to minimise the summed squared relative output error with
               Σ params·bits ≤ budget·Σ params (exact multiple-choice knapsack); overrides `bits`
    targets / exclude   regexes on layer names (default: every linear except the LM head)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rewriter import bcq, bcq_fit, calibration, cost, group_codes, params, weighted
from rewriter.errors import UserError
from rewriter.ir import insert_call, replace_node
from rewriter.matchers.linear import LINEAR_OPS, find_linears, is_lm_head
from rewriter.ops import group_values
from rewriter.pass_base import Contract, Pass

OP = torch.ops.rewrite.shiftadd_linear.default
SENSITIVITY_BITS = (2, 3, 4)


def quantize_layer(w, h, bits, group, rounds, terms, refit, code="pow2", affine_dtype=torch.float16, scale_bits=0):
    """One layer (runs in ctx.map_layers): (BCQWeight, figures) — the packed fit and its errors, with the
    equal-bits round-to-nearest baseline's calibrated error. pow2 code, calibrated: a layer whose fit loses to that
    baseline is refitted with more terms per scale over proportionally larger groups (g·k, terms·k: the same bits
    per weight, finer scales), when that does not cost more bits with this layer's padding; the best is kept.
    The affine code holds round-to-nearest's grid, and its fit falls back to it row by row (rewriter/bcq_fit.py)."""
    wf = w.detach().float()
    in_f = wf.shape[1]
    if code == "affine":
        q = bcq.quantize_affine(wf, bits, group, hessian=h, refit=refit, dtype=affine_dtype, scale_bits=scale_bits)
    else:
        q = bcq.quantize(wf, bits, group, rounds, terms, hessian=h, refit=refit)
    wq = q.dequantize()
    figures = {"weight_error": bcq.relative_error(wf, wq)}
    if h is not None:
        err = weighted.relative_error(wf, wq, h)
        rtn_group = group if code == "affine" else bcq_fit.rtn_group(bits, group, terms)
        rtn = weighted.relative_error(wf, bcq_fit.rtn(wf, bits, rtn_group, affine_dtype,
                                                      scale_bits if code == "affine" else 0), h)
        config = (group, terms)
        if err > rtn and code == "pow2":
            for k in (2, 3, 4):
                g2, t2 = group * k, terms * k
                if t2 > 4 or layer_bits(bits, g2, t2, in_f) > layer_bits(bits, group, terms, in_f) + 1e-9:
                    continue
                q2 = bcq.quantize(wf, bits, g2, rounds, t2, hessian=h, refit=refit)
                e2 = weighted.relative_error(wf, q2.dequantize(), h)
                if e2 < err:
                    q, err, config = q2, e2, (g2, t2)
            wq = q.dequantize()
            figures["weight_error"] = bcq.relative_error(wf, wq)
            figures["refitted_as"] = f"group={config[0]},terms={config[1]}"
        figures["calibrated_error"] = err
        figures["rtn_error"] = rtn
    return q, figures


def _spilled(ctx, q: bcq.BCQWeight) -> bcq.BCQWeight:
    """`q` with its big tensors in scratch files when the model is mapped from a checkpoint (rewriter/lazy_weights.py):
    every layer's fit waits for the last chunk before the rewrite — 4.5 bits per weight, ~0.6 GB on TinyLlama-1.1B."""
    store = ctx.resources.get("weight_store")
    if store is None:
        return q
    spill = lambda t: store.spill_tensor(t) if t is not None else None
    coded = {name: dataclasses.replace(c, codes=spill(c.codes)) for name, c in
             (("scale_codes", q.scale_codes), ("offset_codes", q.offset_codes)) if c is not None}
    return dataclasses.replace(q, signs=spill(q.signs), scales=spill(q.scales), offsets=spill(q.offsets), **coded)


def layer_bits(bits, group, terms, in_features, code="pow2", scale_bits=0) -> float:
    """Bits per weight of one layer, padding included: bits·in_pad/in + 8·bits·terms·groups/in (pow2), or
    bits·in_pad/in + 32·groups/in (affine: an fp16 scale and offset per group), or with coded scales and offsets
    (scale_bits = b) bits·in_pad/in + 2·(8·⌈b·groups/8⌉ + 16·steps)/in, steps = ⌈groups/S⌉ (rewriter/group_codes.py)."""
    pad = bcq.padded_in(in_features, group)
    groups = pad // group
    if code == "affine" and scale_bits:
        extra = 2 * (8 * -(-scale_bits * groups // 8) + 16 * -(-groups // group_codes.groups_per_step(groups)))
    else:
        extra = (32 if code == "affine" else 8 * bits * terms) * groups
    return (bits * pad + extra) / in_features


def sensitivity(w, h, x, group, terms, code="pow2", scale_bits=0):
    """One layer's output error at 2, 3 and 4 bits (quick data-free fits; calibrated error, else on x)."""
    wf = w.detach().float()
    out = {}
    for b in SENSITIVITY_BITS:
        q = bcq.quantize_affine(wf, b, group, scale_bits=scale_bits) if code == "affine" \
            else bcq.quantize(wf, b, group, 0, terms)
        wq = q.dequantize()
        out[b] = weighted.relative_error(wf, wq, h) if h is not None else bcq.relative_error(x @ wf.t(), x @ wq.t())
    return out


@dataclass(frozen=True)
class ShiftAddPass(Pass):
    name = "shiftadd"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = ("binary-coded weights (packed signs, LUT matmul) on a uniform grid (affine) or with power-of-two scales "
               "(pow2), calibrated GPTQ fit; 2–4 bits")
    fuzz_options = {"calibrate": 2}

    code: str = "affine"
    bits: int = 3
    group: int = 32
    scale_bits: int = 6
    rounds: int = 2
    terms: int = 1
    refit: int = 1
    calibrate: int = calibration.DEFAULT_SAMPLES
    data: str = "self"
    seq: int = calibration.DEFAULT_SEQ
    seed: int = 0
    budget: float = 0.0
    targets: str = ""
    exclude: str = ""

    def __post_init__(self):
        if self.code not in ("affine", "pow2"):
            raise ValueError(f'code must be "affine" or "pow2", got "{self.code}"')
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.group < 8 or self.group % 8:
            raise ValueError(f"group must be a positive multiple of 8, got {self.group}")
        if self.rounds < 0 or self.refit < 0:
            raise ValueError(f"rounds and refit must be >= 0, got {self.rounds}, {self.refit}")
        if not 1 <= self.terms <= 4:
            raise ValueError(f"terms must be in 1..4, got {self.terms}")
        if self.scale_bits and not 2 <= self.scale_bits <= 8:
            raise ValueError(f"scale_bits must be in 2..8 (or 0 = fp16 scales and offsets), got {self.scale_bits}")
        if self.code == "affine" and self.terms != 1:
            raise ValueError(f"terms={self.terms} applies to code=pow2 (the affine code has one fp16 scale per group)")
        calibration.check_options(self.data, self.calibrate, self.seq)
        if self.budget and not 2.0 <= self.budget <= 4.0:
            raise ValueError(f"budget must be an average bit width in [2, 4] (or 0 = off), got {self.budget}")

    def run(self, ctx) -> None:
        gm = ctx.gm
        sites = find_linears(gm, self.targets or None, self.exclude or None)
        if not self.targets:
            sites = [s for s in sites if not is_lm_head(gm, s)]
        if not sites:
            layers = [s.name for s in find_linears(gm)]
            raise UserError(f'shiftadd: no linear layer matches targets="{self.targets}"; layers are: '
                            f"{', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}")
        bytes_before = cost.program_params(gm).get("bytes", 0)
        spec = calibration.spec_of(self)
        calibrated = spec.samples > 0
        acts = ctx.activations([s.x for s in sites])
        xs = {s.name: acts[s.x].reshape(-1, s.in_features).float() for s in sites}
        chunks = calibration.site_chunks(ctx, spec, sites) if calibrated else [sites]
        bits_for = {s.name: self.bits for s in sites}
        if self.budget:
            errors = {}
            for chunk in chunks:
                errors.update(self._sensitivities(ctx, chunk, spec, xs))
            bits_for = self._allocate(ctx, sites, errors)
        # fitted chunk by chunk (each chunk's Grams, fp32 weights and fits freed before the next), replaced in the
        # graph once every chunk is done, so every chunk's statistics saw the program as the pass received it
        fitted = []
        for chunk in chunks:
            stats = calibration.layer_stats(ctx, spec, chunk) if calibrated else None
            # views of the stored weights, converted in the worker: only the items in flight are copied
            items = [(s.weight_out_in(gm).detach(), stats.gram(s.name) if stats is not None else None,
                      bits_for[s.name], self.group, self.rounds, self.terms, self.refit, self.code,
                      bcq.affine_dtype(s.weight_tensor(gm).dtype), self._scale_bits) for s in chunk]
            fitted += [(site, (_spilled(ctx, q), figures))
                       for site, (q, figures) in zip(chunk, ctx.map_layers(quantize_layer, items, "quantising"))]
            del stats, items
        weights_before = weights_after = 0
        worse = []
        for site, (q, figures) in fitted:
            w = site_weight(gm, site)
            x = xs[site.name]
            figures["output_error"] = bcq.relative_error(x @ w.t(), x @ q.dequantize().t())
            if "rtn_error" in figures:
                figures["worse_than_rtn"] = figures["calibrated_error"] > figures["rtn_error"]
                if figures["worse_than_rtn"]:
                    worse.append(site.name)
            layer_bytes = w.numel() * site.weight_tensor(gm).element_size()
            weights_before += layer_bytes
            weights_after += q.nbytes
            self._replace(gm, site, q, calibrated)
            ctx.site(site.name, bits=bits_for[site.name], **{k: figures[k] for k in ("weight_error", "output_error")},
                     **{k: v for k, v in figures.items() if k not in ("weight_error", "output_error")},
                     bits_per_weight=round(q.bits_per_weight, 4), bytes_before=layer_bytes, bytes_after=q.nbytes)
        bytes_after = cost.program_params(gm).get("bytes", 0)
        ctx.message(f"quantised linear weights: {weights_before:,} B -> {weights_after:,} B "
                    f"({100 * (1 - weights_after / max(weights_before, 1)):.1f}% less); model: {bytes_before:,} B -> "
                    f"{bytes_after:,} B ({100 * (1 - bytes_after / max(bytes_before, 1)):.1f}% less)")
        if calibrated:
            ctx.message(f"output error on the calibration data vs round-to-nearest at equal bits per weight: "
                        f"{len(sites) - len(worse)}/{len(sites)} layers not worse (held-out text can differ: "
                        f"python -m bench.quant_layers)"
                        + (f" (worse: {', '.join(worse[:8])}{' ...' if len(worse) > 8 else ''})" if worse else ""))

    # ---- helpers ---------------------------------------------------------------------------------------------
    @property
    def _scale_bits(self) -> int:
        return self.scale_bits if self.code == "affine" else 0

    def _replace(self, gm, site, q: bcq.BCQWeight, calibrated: bool) -> None:
        signs = params.add_tensor(gm, site.tensor_name("bcq_signs"), q.signs)
        exps = params.add_tensor(gm, site.tensor_name("bcq_exponents"), q.exponents)
        args = (site.x, params.get_attr_node(gm, signs), params.get_attr_node(gm, exps), site.bias,
                site.in_features, q.group)
        if q.scale_codes is not None:
            args += tuple(insert_group_values(gm, site.node, site.tensor_name(f"bcq_{role}"), coded)
                          for role, coded in (("scales", q.scale_codes), ("offsets", q.offset_codes)))
        elif q.scales is not None:
            scales = params.add_tensor(gm, site.tensor_name("bcq_scales"), q.scales)
            offsets = params.add_tensor(gm, site.tensor_name("bcq_offsets"), q.offsets)
            args += (params.get_attr_node(gm, scales), params.get_attr_node(gm, offsets))
        new = insert_call(gm, site.node, OP, args, pass_name=self.name, rule=f"bcq-{site.rule}", replaces=site.node,
                          calibrated=calibrated)
        replace_node(gm, site.node, new)
        params.remove_if_unused(gm, site.weight_name)

    def _sensitivities(self, ctx, chunk, spec, xs) -> dict[str, dict[int, float]]:
        """Output error of each layer of `chunk` at 2, 3 and 4 bits (calibrated when `spec` calibrates)."""
        stats = calibration.layer_stats(ctx, spec, chunk) if spec.samples > 0 else None
        items = [(s.weight_out_in(ctx.gm).detach(), stats.gram(s.name) if stats is not None else None, xs[s.name],
                  self.group, self.terms, self.code, self._scale_bits) for s in chunk]
        return {s.name: e for s, e in zip(chunk, ctx.map_layers(sensitivity, items, "measuring sensitivity"))}

    def _allocate(self, ctx, sites, errors) -> dict[str, int]:
        """Per-layer bits under the average-bits budget from measured sensitivities; reports the table."""
        sizes = {s.name: s.in_features * s.out_features for s in sites}
        choice = allocate_bits(errors, sizes, self.budget)
        avg = sum(sizes[n] * b for n, b in choice.items()) / sum(sizes.values())
        rows = [f"{n}: " + " ".join(f"{b}b={errors[n][b]:.4f}" for b in SENSITIVITY_BITS) + f" -> {choice[n]} bits"
                for n in choice]
        ctx.message(f"bit allocation (budget {self.budget} bits, got {avg:.3f}; output error at 2/3/4 bits):\n  "
                    + "\n  ".join(rows))
        for n, b in choice.items():
            ctx.site(n, status="allocated", bits=b, **{f"output_error_{k}b": v for k, v in errors[n].items()})
        return choice


def insert_group_values(gm, before, name: str, coded: group_codes.GroupCodes):
    """Store coded scales or offsets as `name`_codes / `name`_steps and insert the node that decodes them."""
    codes = params.add_tensor(gm, f"{name}_codes", coded.codes)
    steps = params.add_tensor(gm, f"{name}_steps", coded.steps)
    args = (params.get_attr_node(gm, codes), params.get_attr_node(gm, steps), coded.groups, coded.bits, coded.signed)
    return insert_call(gm, before, group_values.OP, args, pass_name="shiftadd", rule="group-codes")


def site_weight(gm, site) -> torch.Tensor:
    return site.weight_out_in(gm).detach().float()


def allocate_bits(errors: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """Minimise Σ err[l][b_l]² subject to Σ size_l·b_l ≤ budget·Σ size_l (b_l ∈ errors' keys).

    Exact dynamic programme over the extra bits above the minimum, in units of gcd(sizes) (when that makes more
    than 100,000 units, sizes are rounded up to a coarser unit: still within budget, near-optimal)."""
    import math
    names = list(errors)
    options = sorted(next(iter(errors.values())))
    low = options[0]
    unit = 0
    for n in names:
        unit = math.gcd(unit, sizes[n])
    total_size = sum(sizes.values())
    if budget < low:
        raise UserError(f"shiftadd: budget {budget} is below the smallest bit width {low}")
    if (budget - low) * total_size / unit > 100_000:
        unit = math.ceil((budget - low) * total_size / 100_000)
    capacity = int(math.floor((budget - low) * total_size / unit + 1e-9))
    # best[c] = (total error, choices) using at most c units
    best = [(0.0, ())] * (capacity + 1)
    for n in names:
        weight = -(-sizes[n] // unit)
        new = [(math.inf, ())] * (capacity + 1)
        for c in range(capacity + 1):
            for b in options:
                need = (b - low) * weight
                if need <= c and best[c - need][0] < math.inf:
                    total = best[c - need][0] + errors[n][b] ** 2
                    if total < new[c][0]:
                        new[c] = (total, best[c - need][1] + (b,))
        best = new
    return dict(zip(names, best[capacity][1]))
