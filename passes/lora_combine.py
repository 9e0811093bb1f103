"""`lora-combine` — a new adapter from a weighted combination of named adapters (PEFT's add_weighted_adapter).

    lora-combine{adapters='a:0.7,b:0.3',method=ties,density=0.5,name=mix}    (also adapters=a:0.7+b:0.3)

Methods (rewriter/lora_combine.py has the definitions): cat (exact: B·A = Σ wₖ·sₖ·Bₖ·Aₖ, rank Σ rₖ), svd (best
rank-`rank` approximation of that sum; `clamp` quantile), linear, ties, dare_linear, dare_ties, magnitude_prune
(the A's and the B's merged separately as task vectors — TIES-Merging's trim / elect sign / disjoint mean, DARE's
random drop and rescale by `density`; equal ranks needed). The result has scale 1, on every layer holding at least
one of the adapters (the others count as absent there, as in PEFT). DARE draws its masks from a generator seeded
with `seed`, in PEFT's order of draws.

Graph, before → after (rule "combine"):

    rewrite.multi_lora_linear(…, [A_a, A_b], [B_a, B_b], …, "a,b", …)
        → rewrite.multi_lora_linear(…, [A_a, A_b, A_mix], [B_a, B_b, B_mix], …, "a,b,mix", gates [0, 0, 1] …)

`activate=true` (default) makes the new adapter the only active one (semantic contract: the function changes on
purpose, as `set_adapter("mix")` after PEFT's add_weighted_adapter); `activate=false` adds it switched off (exact).
DoRA adapters are refused: their magnitudes have no defined combination (PEFT drops them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rewriter import params
from rewriter.adapters import (LORA_OPS, Adapter, ContractByOptions, adapter_names, check_name, is_lora_node,
                               parse_adapter_list, read_layer, tensor, write_layer)
from rewriter.errors import UserError
from rewriter.lora_combine import SAME_RANK, combine
from rewriter.lora_runtime import adapter_table
from rewriter.pass_base import Contract, Pass


def _contract(p) -> Contract:
    return Contract.SEMANTIC if p.activate else Contract.EXACT


@dataclass(frozen=True)
class LoraCombinePass(Pass):
    name = "lora-combine"
    contract = ContractByOptions(Contract.SEMANTIC, _contract)
    target_ops = LORA_OPS
    summary = "new adapter = weighted combination of adapters: linear, cat, svd, ties, dare_linear, dare_ties, " \
              "magnitude_prune (PEFT's add_weighted_adapter)"
    option_keys = {"adapter_name": "name"}

    adapters: str = ""
    method: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "cat"
    density: float = 0.5
    adapter_name: str = "mix"        # spec key `name`
    rank: int = 0
    clamp: float = 0.0
    majority: Literal["total", "frequency"] = "total"
    seed: int = 0
    activate: bool = True

    def __post_init__(self):
        check_name(self.adapter_name)
        if not 0.0 <= self.density:
            raise ValueError(f"density must be >= 0, got {self.density}")
        if not 0.0 <= self.clamp < 1.0:
            raise ValueError(f"clamp must be a quantile in [0, 1), got {self.clamp}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: the largest source rank), got {self.rank}")

    def run(self, ctx) -> None:
        gm = ctx.gm
        if not self.adapters.strip():
            raise UserError("lora-combine needs adapters=NAME:WEIGHT,... (e.g. adapters='a:0.7,b:0.3')")
        chosen = parse_adapter_list(self.adapters, weights=True, what="lora-combine adapters")
        table = adapter_table(gm)
        unknown = [n for n, _ in chosen if n not in table]
        if unknown:
            raise UserError(f"lora-combine: no adapter named {', '.join(map(repr, unknown))} in the program "
                            f"(it has {', '.join(sorted(table)) or 'none'})")
        if self.adapter_name in table:
            raise UserError(f'lora-combine: the program has an adapter named "{self.adapter_name}" already; '
                            "choose another name=")
        gen = torch.Generator().manual_seed(self.seed)
        weights = dict(chosen)
        for node in [n for n in gm.graph.nodes if is_lora_node(n)]:
            layer = read_layer(node)
            sources = [a for a in layer.adapters if a.name in weights]
            if not sources:
                continue
            name = layer.name
            if any(a.dora for a in sources):
                raise UserError(f"lora-combine: adapter {next(a.name for a in sources if a.dora)!r} on {name} is "
                                "DoRA; combining DoRA magnitudes is not defined")
            if self.method in SAME_RANK and len({tensor(gm, a.a).shape[0] for a in sources}) > 1:
                raise UserError(f"lora-combine: method {self.method} needs adapters of one rank; on {name} they "
                                f"have ranks {[tensor(gm, a.a).shape[0] for a in sources]} (use cat or svd)")
            a, b = combine(self.method, [(tensor(gm, s.a), tensor(gm, s.b), s.scale) for s in sources],
                           [weights[s.name] for s in sources], density=self.density, rank=self.rank,
                           clamp=self.clamp, majority=self.majority, generator=gen)
            own = adapter_names(layer.key, self.adapter_name)
            params.add_tensor(gm, own["A"], a.contiguous(), trainable=True)
            params.add_tensor(gm, own["B"], b.contiguous(), trainable=True)
            if self.activate:
                for other in layer.adapters:
                    other.gate = 0.0
            layer.adapters.append(Adapter(self.adapter_name, own["A"], own["B"], 1.0,
                                          1.0 if self.activate else 0.0, -1))
            layer.fixed = False
            write_layer(gm, layer, pass_name=self.name, rule="combine")
            ctx.site(name, method=self.method, sources=[s.name for s in sources], rank=a.shape[0])
        if self.activate:   # layers without any source adapter: only the new adapter is active → theirs go off
            for node in [n for n in gm.graph.nodes if is_lora_node(n)]:
                layer = read_layer(node)
                if layer.find(self.adapter_name) is None and any(a.gate for a in layer.adapters):
                    for other in layer.adapters:
                        other.gate = 0.0
                    layer.fixed = False
                    write_layer(gm, layer, pass_name=self.name, rule="select")
