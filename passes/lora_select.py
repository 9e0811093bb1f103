"""`lora-select` — choose which named adapters are active (and how strongly), in every LoRA layer.

    lora-select{adapters=a}            only adapter a is active
    lora-select{adapters='a,b'}        a and b, summed (also written a+b)
    lora-select{adapters='a:0.7,b:1'}  weighted: y = x·Wᵀ + b + Σ gₖ·sₖ·Bₖ·Aₖ·x (DoRA: rewriter/ops/multi_lora_linear.py)
    lora-select{adapters=none}         every adapter off (the base model's function)

Graph, before → after (rules "select" / "make-switchable"):

    rewrite.multi_lora_linear(…, gates=[1, 1], …)   rewrite.multi_lora_linear(…, gates=[1, 0], …)
    rewrite.lora_linear(x, W, b, A, B, s)           rewrite.multi_lora_linear(x, W, b, None, [A], [B], [], "default",
                                                                              [s], [g], [-1], [-1])  (fixed → switchable)

The same switch without a pass (no re-export): `rewriter.lora_runtime.set_adapters(program, [...])` or
`result.set_adapters([...])`. Contract: semantic (choosing adapters changes the function on purpose).
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter.adapters import LORA_OPS, is_lora_node, parse_adapter_list, read_layer, write_layer
from rewriter.errors import UserError
from rewriter.lora_runtime import adapter_table
from rewriter.pass_base import Contract, Pass


@dataclass(frozen=True)
class LoraSelectPass(Pass):
    name = "lora-select"
    contract = Contract.SEMANTIC
    target_ops = LORA_OPS
    summary = "choose the active adapters and their weights (a, a+b, a:0.7+b:0.3, none); makes fixed layers switchable"

    adapters: str = ""

    def run(self, ctx) -> None:
        gm = ctx.gm
        if not self.adapters.strip():
            raise UserError("lora-select needs adapters=NAMES (e.g. adapters=a, adapters='a,b', adapters=none)")
        text = self.adapters.strip()
        chosen = {} if text.lower() == "none" else dict(parse_adapter_list(text, weights=True,
                                                                            what="lora-select adapters"))
        table = adapter_table(gm)
        unknown = [n for n in chosen if n not in table]
        if unknown:
            raise UserError(f"lora-select: no adapter named {', '.join(map(repr, unknown))} in the program "
                            f"(it has {', '.join(sorted(table)) or 'none'})")
        for node in [n for n in gm.graph.nodes if is_lora_node(n)]:
            layer = read_layer(node)
            gates = [float(chosen.get(a.name, 0.0)) for a in layer.adapters]
            if [a.gate for a in layer.adapters] == gates and not (layer.fixed and gates != [1.0]):
                continue
            rule = "make-switchable" if layer.fixed else "select"
            for a, g in zip(layer.adapters, gates):
                a.gate = g
            layer.fixed = False
            name = layer.name
            write_layer(gm, layer, pass_name=self.name, rule=rule)
            ctx.site(name, active={a.name: a.gate for a in layer.adapters if a.gate})
        ctx.message(f"lora-select: active {', '.join(f'{n}×{w:g}' for n, w in chosen.items()) or 'none'}")
