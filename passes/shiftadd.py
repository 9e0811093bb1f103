"""`shiftadd` — binary-coding quantisation with power-of-two scales (ShiftAddLLM, You et al. 2024).

Each matched weight W (out, in) becomes, per row r and group j of `group` input columns,

    W[r, group j] ≈ Σᵢ αᵢ·Bᵢ,   Bᵢ ∈ {±1}^group,   αᵢ = Σₜ 2^{eᵢₜ}  (terms t < `terms`; exponents stored as int8)

so x·Wᵀ needs only sign flips, additions and shifts. Greedy start, `rounds` of alternating refinement (least-squares
α given B, snap α to powers of two, best B given α); see rewriter/bcq.py for the algorithm and storage.
Signs are packed 8 per uint8: bits per weight = bits + 8·bits·terms/group (3.19 at bits=3, group=128).

Graph, before → after (rule "bcq-<matcher rule>"):

    y = aten.linear(x, W, b)        y = rewrite.shiftadd_linear(x, signs, exponents, b, in_features, group)
    y = aten.addmm(b, x, W_io)      y = rewrite.shiftadd_linear(x, signs, exponents, b, in_features, group)

W is removed (unless another op still reads it, e.g. a tied embedding).

Options:
    bits       sign planes per weight (1–8; ShiftAddLLM uses 2–4)
    group      input columns sharing one α vector (multiple of 8)
    rounds     alternating-refinement rounds (0 = greedy only)
    terms      powers of two summed per α (1 = a single shift)
    calibrate  N > 0: GPTQ-style error compensation with H = mean xxᵀ over the first N activation rows of the
               example inputs; both variants are measured and the one with the lower output error is kept
    budget     average bits per weight (2–4): bits chosen per layer, from each layer's output error at 2/3/4 bits
               on the example inputs, to minimise the summed squared relative output error with
               Σ params·bits ≤ budget·Σ params (exact multiple-choice knapsack); overrides `bits`
    targets / exclude   regexes on layer names (default: every linear except the LM head)

Per layer the report has weight_error (‖W − Ŵ‖/‖W‖), output_error (‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ on the example
inputs), bits_per_weight, bytes before/after; a message gives the model's memory before/after.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rewriter import bcq, cost, params
from rewriter.errors import UserError
from rewriter.ir import insert_call, replace_node
from rewriter.matchers.linear import LINEAR_OPS, find_linears, is_lm_head
from rewriter.pass_base import Contract, Pass

OP = torch.ops.rewrite.shiftadd_linear.default
SENSITIVITY_BITS = (2, 3, 4)


@dataclass(frozen=True)
class ShiftAddPass(Pass):
    name = "shiftadd"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = "binary-coded weights with power-of-two scales (packed signs, LUT matmul); 2–4 bits"

    bits: int = 3
    group: int = 128
    rounds: int = 1
    terms: int = 1
    calibrate: int = 0
    budget: float = 0.0
    targets: str = ""
    exclude: str = ""

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.group < 8 or self.group % 8:
            raise ValueError(f"group must be a positive multiple of 8, got {self.group}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not 1 <= self.terms <= 4:
            raise ValueError(f"terms must be in 1..4, got {self.terms}")
        if self.calibrate < 0:
            raise ValueError(f"calibrate must be >= 0 (rows of activations), got {self.calibrate}")
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
        acts = ctx.activations([s.x for s in sites])
        xs = {s.name: acts[s.x].reshape(-1, s.in_features).float() for s in sites}
        bits_for = {s.name: self.bits for s in sites}
        if self.budget:
            bits_for = self._allocate(ctx, sites, xs)
        weights_before = weights_after = 0
        for site in ctx.progress(sites, "quantising"):
            w = site.weight_out_in(gm).detach().float()
            x = xs[site.name]
            bits = bits_for[site.name]
            q = bcq.quantize(w, bits, self.group, self.rounds, self.terms)
            figures = self._errors(w, q, x)
            info = {}
            if self.calibrate:
                xc = x[: self.calibrate].double()
                h = xc.t() @ xc / max(xc.shape[0], 1)
                qc = bcq.quantize(w, bits, self.group, self.rounds, self.terms, hessian=h)
                comp = self._errors(w, qc, x)
                info = {"weight_error_plain": figures[0], "output_error_plain": figures[1],
                        "weight_error_gptq": comp[0], "output_error_gptq": comp[1]}
                if comp[1] <= figures[1]:
                    q, figures = qc, comp
                info["compensated"] = q is qc
            layer_bytes = w.numel() * site.weight_tensor(gm).element_size()
            weights_before += layer_bytes
            weights_after += q.nbytes
            self._replace(gm, site, q)
            ctx.site(site.name, bits=bits, weight_error=figures[0], output_error=figures[1],
                     bits_per_weight=round(q.bits_per_weight, 4), bytes_before=layer_bytes, bytes_after=q.nbytes,
                     **info)
        bytes_after = cost.program_params(gm).get("bytes", 0)
        ctx.message(f"quantised linear weights: {weights_before:,} B -> {weights_after:,} B "
                    f"({100 * (1 - weights_after / max(weights_before, 1)):.1f}% less); model: {bytes_before:,} B -> "
                    f"{bytes_after:,} B ({100 * (1 - bytes_after / max(bytes_before, 1)):.1f}% less)")

    # ---- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _errors(w: torch.Tensor, q: bcq.BCQWeight, x: torch.Tensor) -> tuple[float, float]:
        wq = q.dequantize()
        return bcq.relative_error(w, wq), bcq.relative_error(x @ w.t(), x @ wq.t())

    def _replace(self, gm, site, q: bcq.BCQWeight) -> None:
        signs = params.add_tensor(gm, site.tensor_name("bcq_signs"), q.signs)
        exps = params.add_tensor(gm, site.tensor_name("bcq_exponents"), q.exponents)
        args = (site.x, params.get_attr_node(gm, signs), params.get_attr_node(gm, exps), site.bias,
                site.in_features, self.group)
        new = insert_call(gm, site.node, OP, args, pass_name=self.name, rule=f"bcq-{site.rule}", replaces=site.node)
        replace_node(gm, site.node, new)
        params.remove_if_unused(gm, site.weight_name)

    def _allocate(self, ctx, sites, xs) -> dict[str, int]:
        """Per-layer bits under the average-bits budget from measured sensitivities; reports the table."""
        errors, sizes = {}, {}
        for site in ctx.progress(sites, "measuring sensitivity"):
            w = site.weight_out_in(ctx.gm).detach().float()
            sizes[site.name] = w.numel()
            errors[site.name] = {b: self._errors(w, bcq.quantize(w, b, self.group, self.rounds, self.terms),
                                                 xs[site.name])[1] for b in SENSITIVITY_BITS}
        choice = allocate_bits(errors, sizes, self.budget)
        avg = sum(sizes[n] * b for n, b in choice.items()) / sum(sizes.values())
        rows = [f"{n}: " + " ".join(f"{b}b={errors[n][b]:.4f}" for b in SENSITIVITY_BITS) + f" -> {choice[n]} bits"
                for n in choice]
        ctx.message(f"bit allocation (budget {self.budget} bits, got {avg:.3f}; output error at 2/3/4 bits):\n  "
                    + "\n  ".join(rows))
        for n, b in choice.items():
            ctx.site(n, status="allocated", bits=b, **{f"output_error_{k}b": v for k, v in errors[n].items()})
        return choice


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
