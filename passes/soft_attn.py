"""`soft-attn` — replace softmax attention by SOFT: Gaussian-kernel attention in Nyström form with m landmarks
and a Newton–Schulz pseudo-inverse (Lu et al. 2021). The math is in rewriter/ops/soft_attention.py:

    out = κ(Q, Q̃) · pinv(κ(Q̃, Q̃)) · κ(Q̃, Q) · V,   κ(a, b) = exp(−‖a − b‖² / (2√d)),   Q̃ = pool(Q) to m rows

Graph, before → after:

    o = aten.scaled_dot_product_attention(q, k, v)          o = rewrite.soft_attention(q, v, m, iters, ridge)
    o = aten.matmul(softmax(q @ kᵀ · s), v)            →    (rule "soft-sdpa" / "soft-softmax-matmul")

Separate q and k: SOFT ties queries and keys (K = Q) so that κ(Q̃, Q̃) is symmetric positive semi-definite and
Newton–Schulz converges; a pretrained model has separate projections, so this pass uses one of them for both:
`qk="q"` (default) feeds the queries, `qk="k"` the keys. The model's score scale is not used (the kernel has
its own width 2√d). The result is a different function (contract: semantic): each site records its output
drift against the softmax attention on the example inputs, and its cost per head as formulas in the sequence
length T (sympy): softmax 2·T²·(d + dv) FLOPs and T² attention elements vs SOFT's linear-in-T terms, with the
length where SOFT becomes cheaper. Expect a large drift on a pretrained softmax model (about 5–7× the output
norm on the demos): SOFT's kernel rows are not normalised (κ(q, q) = 1 and rows sum to more than 1), so it is a
pass for models that will be (re)trained with it, as in the paper, not a drop-in approximation.

Skipped sites (with the reason): causal or padding masks (the Nyström factors see the whole sequence; there is
no causal SOFT — masks that let every query see every key on the example inputs are dropped), cross-attention
(Tq ≠ Tk: shared q/k needs one sequence), and everything the attention matcher does not recognise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import sympy
import torch

from rewriter.ir import insert_call, replace_node
from rewriter.matchers.attention import ATTENTION_OPS, classify_keep, drop_side_nodes, keep_mask_value, sites_and_values
from rewriter.ops import soft_attention as op
from rewriter.pass_base import Contract, Pass

T = sympy.Symbol("T", positive=True)


def cost_formulas(m: int, d: int, dv: int, iters: int) -> dict:
    """Per-head FLOPs and attention-matrix elements as expressions in T, and the T where SOFT gets cheaper."""
    softmax_flops = 2 * T ** 2 * (d + dv) + 5 * T ** 2
    soft_flops, soft_mem = op.cost_terms(T, m, d, dv, iters)
    crossing = [r for r in sympy.solve(sympy.Eq(softmax_flops, soft_flops), T) if r.is_real and r > 0]
    mem_crossing = [r for r in sympy.solve(sympy.Eq(T ** 2, soft_mem), T) if r.is_real and r > 0]
    return {"flops_per_head_softmax": str(sympy.expand(softmax_flops)),
            "flops_per_head_soft": str(sympy.expand(soft_flops)),
            "memory_per_head_softmax": str(T ** 2), "memory_per_head_soft": str(sympy.expand(soft_mem)),
            "flops_crossover_T": int(sympy.ceiling(max(crossing))) if crossing else None,
            "memory_crossover_T": int(sympy.ceiling(max(mem_crossing))) if mem_crossing else None}


@dataclass(frozen=True)
class SoftAttnPass(Pass):
    name = "soft-attn"
    contract = Contract.SEMANTIC
    target_ops = ATTENTION_OPS
    summary = "softmax attention → SOFT (Gaussian kernel, Nyström landmarks, Newton–Schulz pinv): linear in T"

    landmarks: int = 32
    iters: int = 20
    ridge: float = 0.0
    qk: Literal["q", "k"] = "q"

    def __post_init__(self):
        if self.landmarks < 1:
            raise ValueError(f"landmarks must be >= 1, got {self.landmarks}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")

    def run(self, ctx) -> None:
        gm = ctx.gm
        sites, values = sites_and_values(ctx)
        for site in ctx.progress(sites, "attention"):
            if site.seq_q != site.seq_k:
                ctx.skip(site.name, f"cross-attention (Tq={site.seq_q}, Tk={site.seq_k}): SOFT shares q and k")
                continue
            q_value = values.get(site.q)
            keep = keep_mask_value(site.mask_kind, values.get(site.mask) if site.mask is not None else None,
                                   site.seq_q, site.seq_k, q_value.device if isinstance(q_value, torch.Tensor) else None)
            if isinstance(keep, str):
                ctx.skip(site.name, keep)
                continue
            kind = classify_keep(keep, site.seq_q, site.seq_k)
            if kind != "none":
                ctx.skip(site.name, f"{kind} mask: SOFT's Nyström factors see the whole sequence (no masked form)")
                continue
            shared = site.q if self.qk == "q" else site.k
            m = min(self.landmarks, site.seq_q)
            new = insert_call(gm, site.node, op.OP, (shared, site.v, m, self.iters, float(self.ridge)),
                              pass_name=self.name, rule=f"soft-{site.rule}", replaces=site.node)
            figures = {"rule": site.rule, "landmarks": m, "shared_qk": self.qk, "seq": site.seq_q,
                       "mask_dropped": site.mask_kind != "none"}
            x, v, out = (values.get(n) for n in (shared, site.v, site.node))
            if all(isinstance(t, torch.Tensor) for t in (x, v, out)):
                with torch.no_grad():
                    got = op.reference(x, v, m, self.iters, self.ridge)
                    figures["output_drift"] = float((got.double() - out.double()).abs().max()
                                                    / out.double().abs().max().clamp_min(1e-30))
            figures.update(cost_formulas(self.landmarks, site.head_dim, site.value_dim, self.iters))
            softmax = site.softmax
            replace_node(gm, site.node, new)
            drop_side_nodes(gm, softmax)
            ctx.site(site.name, **figures)
