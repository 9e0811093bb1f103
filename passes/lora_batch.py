"""`lora-batch` — mixed-adapter batches: every LoRA layer takes a per-row adapter index (Punica's BGMV/SGMV,
S-LoRA: one program serves requests for different adapters in one batch).

    lora-batch{adapters='a,b,c'}     batch ids a = 0, b = 1, c = 2 (default: every adapter, in graph order)

    y[i] = x[i]·Wᵀ + b + s_{k}·B_{k}·A_{k}·x[i]   with k the adapter whose id is index[i]; index[i] = −1: base only

Graph, before → after (rule "batch"):

    rewrite.multi_lora_linear(…, ids=[-1, -1], …, index=None)   rewrite.multi_lora_linear(…, ids=[0, 1], …, lora_index)
    rewrite.lora_linear(x, W, b, A, B, s)                       rewrite.multi_lora_linear(…, [A], [B], …, lora_index)

`lora_index` is a program buffer (int64, one entry per row of the batch: x.shape[0]); empty — as created — means
no per-row choice (the gates apply), so the pass keeps the function (exact). Set it per call:
`rewriter.lora_runtime.set_adapter_index(program, ["a", "c", None])`, `result.set_adapter_index(...)` or
`with adapter_index(program, rows): ...`. `--codegen triton` lowers the layers to one kernel doing the base GEMM
and each row's own rank-r update (codegen/templates/lora_batch.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter.adapters import LORA_OPS, index_node, is_lora_node, parse_adapter_list, read_layer, write_layer
from rewriter.errors import UserError
from rewriter.lora_runtime import adapter_table
from rewriter.pass_base import Contract, Pass


@dataclass(frozen=True)
class LoraBatchPass(Pass):
    name = "lora-batch"
    contract = Contract.EXACT
    target_ops = LORA_OPS
    summary = "per-row adapter index for mixed-adapter batches (ids by order); one fused kernel with --codegen"

    adapters: str = ""

    def run(self, ctx) -> None:
        gm = ctx.gm
        table = adapter_table(gm)
        names = [n for n, _ in parse_adapter_list(self.adapters, what="lora-batch adapters")] if self.adapters \
            else list(table)
        unknown = [n for n in names if n not in table]
        if unknown:
            raise UserError(f"lora-batch: no adapter named {', '.join(map(repr, unknown))} in the program "
                            f"(it has {', '.join(sorted(table)) or 'none'})")
        ids = {n: i for i, n in enumerate(names)}
        index = index_node(gm)
        for node in [n for n in gm.graph.nodes if is_lora_node(n)]:
            layer = read_layer(node)
            if not any(a.name in ids for a in layer.adapters):
                continue
            for a in layer.adapters:
                a.id = ids.get(a.name, -1)
            layer.index = index
            layer.fixed = False
            name = layer.name
            write_layer(gm, layer, pass_name=self.name, rule="batch")
            ctx.site(name, ids={a.name: a.id for a in layer.adapters})
        ctx.message("lora-batch: batch ids " + ", ".join(f"{n}={i}" for n, i in ids.items())
                    + " — set the rows' adapters with rewriter.lora_runtime.set_adapter_index")
