"""`lora-unmerge` — undo `lora-merge`: restore the base weight bit for bit and put the adapter back.

    W = ord⁻¹( ord(round(W' − s·B·A)) + c )          (c: the stored ulp correction; ord: rewriter/adapters.py)

Graph, before → after (rule "unmerge"):

    y = aten.linear(x, W', b)           y = rewrite.lora_linear(x, W, b, A, B, s)
    y = aten.addmm(b, x, W'_io)         y = rewrite.lora_linear(x, aten.t(W_io), b, A, B, s)

A and B become trainable Parameters again; the `lora_merged` / `lora_correction` buffers are removed.
Contract: exact (the base weights come back bit for bit; the function equals the merged one up to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter import params
from rewriter.adapters import adapter_names, build_lora_node, delta, unmerge_weight
from rewriter.ir import get_attr_value, replace_node
from rewriter.matchers.linear import LINEAR_OPS, find_linears
from rewriter.pass_base import Contract, Pass


@dataclass(frozen=True)
class LoraUnmergePass(Pass):
    name = "lora-unmerge"
    contract = Contract.EXACT
    target_ops = LINEAR_OPS
    summary = "restore merged LoRA layers: base weights bit-exact, adapters trainable again"

    def should_run(self, ctx):
        if not any(n.endswith("lora_merged") for n, _ in ctx.gm.named_buffers()):
            return "no merged LoRA layers (nothing to unmerge)"
        return None

    def run(self, ctx) -> None:
        gm = ctx.gm
        for site in ctx.progress(find_linears(gm), "unmerging adapters"):
            names = adapter_names(site.weight_name)
            if not params.has_attr(gm, names["merged"]):
                continue
            scale, dropout = (float(v) for v in get_attr_value(gm, names["merged"]))
            a = get_attr_value(gm, names["A"])
            b = get_attr_value(gm, names["B"])
            correction = get_attr_value(gm, names["correction"])
            d = delta(a, b, scale)
            stored = site.weight_tensor(gm).detach()
            original = unmerge_weight(stored, d if site.layout == "out_in" else d.t(), correction)
            params.set_tensor(gm, site.weight_name, original)
            for key in ("merged", "correction"):
                params.remove_if_unused(gm, names[key])
            params.make_trainable(gm, names["A"], True)
            params.make_trainable(gm, names["B"], True)
            new = build_lora_node(gm, site, names["A"], names["B"], scale, dropout, pass_name=self.name,
                                  rule="unmerge")
            replace_node(gm, site.node, new)
            ctx.site(site.name)
