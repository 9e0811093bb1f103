"""`softplus-attn` — replace softmax attention by length-scaled softplus attention (LSSA), optionally with
re-weighting (LSSAR); Gao & Spratling, arXiv 2501.13428. The math is in rewriter/ops/softplus_attention.py:

    A = softplus(log d · log Nᵢ · q̂k̂ᵀ) ⊙ M,  rows L1-normalised;  reweight=true: A ← ReLU(A·Nᵢ − O)^p, L1 again

Graph, before → after (every form rewriter/matchers/attention.py recognises):

    o = aten.scaled_dot_product_attention(q, k, v, M?, is_causal=c, scale=s)
    o = aten.matmul(softmax(q @ kᵀ · s [+ M | masked_fill | where]), v)
        →  o = rewrite.softplus_attention(q, k, v, keep?, c, reweight, p, train_len, eps)

where keep is the bool "may attend" mask: the SDPA bool mask itself, ~M for masked_fill (or the tensor under
its bitwise_not), M > −1e4 for additive masks (rule "mask-from-additive"; only when, on the example inputs, M
holds nothing but 0 and very negative values — other additive masks are biases and the site is skipped).

Causal and bidirectional attention both work: Nᵢ counts the keys row i may attend to, so Nᵢ = i + 1 under a
causal mask and Nᵢ = sequence length for bidirectional attention without padding (padding masks lower it).
`train_len` (the context the model was trained at; 0 = unknown) limits re-weighting to rows with Nᵢ > train_len,
i.e. to positions beyond the training context. Contract: semantic (the function changes on purpose); every
site records the drift of its output against the softmax attention it replaces on the example inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rewriter.ir import insert_call, replace_node
from rewriter.matchers.attention import (ATTENTION_OPS, classify_keep, drop_side_nodes, sites_and_values,
                                         keep_mask_node, keep_mask_value)
from rewriter.ops import softplus_attention as op
from rewriter.pass_base import Contract, Pass


def output_drift(before: torch.Tensor, after: torch.Tensor) -> float:
    """max|after − before| / max|before|."""
    before, after = before.double(), after.double()
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))


@dataclass(frozen=True)
class SoftplusAttnPass(Pass):
    name = "softplus-attn"
    contract = Contract.SEMANTIC
    target_ops = ATTENTION_OPS
    summary = "softmax attention → length-scaled softplus attention (LSSA; LSSAR with reweight=true)"

    reweight: bool = False
    p: float = 15.0
    train_len: int = 0
    eps: float = 1e-6

    def __post_init__(self):
        if not self.p > 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        if self.train_len < 0:
            raise ValueError(f"train_len must be >= 0 (0 = re-weight every row), got {self.train_len}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")

    def run(self, ctx) -> None:
        gm = ctx.gm
        sites, values = sites_and_values(ctx)
        for site in ctx.progress(sites, "attention"):
            mask_value = values.get(site.mask) if site.mask is not None else None
            q_value = values.get(site.q)
            keep = keep_mask_value(site.mask_kind, mask_value, site.seq_q, site.seq_k,
                                   q_value.device if isinstance(q_value, torch.Tensor) else None)
            if isinstance(keep, str):
                ctx.skip(site.name, keep)
                continue
            mask_node = keep_mask_node(gm, site, site.node, pass_name=self.name)
            args = (site.q, site.k, site.v, mask_node, site.causal, self.reweight, float(self.p),
                    int(self.train_len), float(self.eps))
            new = insert_call(gm, site.node, op.OP, args, pass_name=self.name,
                              rule=f"{'lssar' if self.reweight else 'lssa'}-{site.rule}", replaces=site.node)
            figures = {"rule": site.rule, "mask": classify_keep(keep, site.seq_q, site.seq_k),
                       "heads": site.q_heads, "head_dim": site.head_dim, "seq": site.seq_q}
            q, k, v, out = (values.get(n) for n in (site.q, site.k, site.v, site.node))
            if all(isinstance(t, torch.Tensor) for t in (q, k, v, out)):
                with torch.no_grad():
                    got = op.reference(q, k, v, keep, False, self.reweight, self.p, self.train_len, self.eps)
                figures["output_drift"] = output_drift(out, got)
            softmax = site.softmax
            replace_node(gm, site.node, new)
            drop_side_nodes(gm, softmax)
            ctx.site(site.name, **figures)
