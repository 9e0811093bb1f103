"""`lora-merge` — fold the active adapters into the base weight, computed in float64 and rounded once.

    W' = round(F(W)),   F = the active adapters' maps in op order (rewriter/lora_fold.py):
         plain W ← W + g·s·B·A;   DoRA W ← (1 + g·(f − 1))·W + g·f·s·B·A,  f = m / ‖W₀ + s·B·A‖_row

Graph, before → after (rule "merge", or "unload"):

    y = rewrite.lora_linear(x, W, b, A, B, s)            y = aten.linear(x, W', b)
    y = rewrite.lora_linear(x, aten.t(W_io), b, …)       y = aten.addmm(b, x, W'_io)   (GPT-2 Conv1D layout restored)
    y = rewrite.multi_lora_linear(x, W, b, …, [A, A₂], …) y = aten.linear(x, W', b)   (every adapter active), or
                                                          y = rewrite.multi_lora_linear(x, W', b, …, [A₂], …)
                                                              (the inactive ones stay switchable)

Two forms of result:
    default      bit-exactly undoable (`lora-unmerge`): A, B (and DoRA m) stay as buffers, with a record per folded
                 adapter (`lora_merged` = [s, dropout] for the fixed form; `lora_folded<sfx>` for switchable layers;
                 `lora_norm<sfx>` = the DoRA norm used) and an integer ulp correction (1 byte per weight unless the
                 adapters dwarf W) — PEFT's unmerge subtracts B·A again and drifts in bf16 (PEFT #1388, #2502).
    unload=true  W' alone: A, B, m, corrections, records, inactive adapters and the row index are dropped — the
                 program has exactly the base model's parameters and bytes (PEFT's merge_and_unload()). Applied to
                 a program merged earlier, it drops what that merge kept.
The report's message says which form was made and how many bytes the kept tensors cost.

Contract: exact — the merged layer differs from the adapter layer only by rounding F(W) once.
Skipped, per layer, with the reason: a weight shared with other ops (tied: the merge would change them too), a
compressed base (merging would leave its structure), no active adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rewriter import cost, params
from rewriter.adapters import (INDEX_BUFFER, LORA_OPS, LoraLayer, adapter_names, dense_node, fold_steps,
                               is_lora_node, is_lora_tensor, layer_of, merged_records, read_layer, shared_readers, tensor,
                               to_buffer, write_layer)
from rewriter.ir import get_attr_value, op_name, replace_node
from rewriter.lora_fold import fold, fold_rounded
from rewriter.pass_base import Contract, Pass



@dataclass(frozen=True)
class LoraMergePass(Pass):
    name = "lora-merge"
    contract = Contract.EXACT
    target_ops = LORA_OPS
    summary = "fold active LoRA/DoRA adapters into the base weights (fp64, rounded once); unload=true drops them"

    unload: bool = False

    def should_run(self, ctx):
        reason = super().should_run(ctx)
        records = merged_records(ctx.gm)
        if reason is not None and records:
            return None if self.unload else "already merged: nothing to merge"
        return reason

    def run(self, ctx) -> None:
        gm = ctx.gm
        kept = 0
        nodes = [n for n in gm.graph.nodes if is_lora_node(n)]   # read each when its turn comes: merging one
        for node in ctx.progress(nodes, "merging adapters"):      # layer changes the next one's input
            kept += self._merge(ctx, read_layer(node))
        if self.unload:
            self._drop_records(ctx)
            if params.has_attr(gm, INDEX_BUFFER) and not params.readers(gm, INDEX_BUFFER):
                params.remove_if_unused(gm, INDEX_BUFFER)
            base = cost.program_params(gm).get("bytes", 0)
            ctx.message(f"lora-merge: unloaded — the program has the base model's parameters only ({base:,} bytes); "
                        "nothing is kept to undo the merge")
        elif kept:
            total = cost.program_params(gm).get("bytes", 0)
            ctx.message(f"lora-merge: bit-exactly undoable form — A, B, records and ulp corrections kept: {kept:,} "
                        f"bytes ({100 * kept / max(total - kept, 1):.1f} % over the rest of the program); "
                        "`lora-merge{unload=true}` drops them")

    # ---- one layer -------------------------------------------------------------------------------------------
    def _merge(self, ctx, layer: LoraLayer) -> int:
        """Merge one layer; returns the bytes kept to undo it."""
        gm = ctx.gm
        storage, transposed = layer.storage
        name = layer.name
        if layer.weight is None:
            ctx.skip(name, f"base is {op_name(layer.base)}: merging would leave its compressed form")
            return 0
        if storage.op != "get_attr":
            ctx.skip(name, "weight is not a stored tensor")
            return 0
        if shared_readers(gm, storage.target, layer.node):
            ctx.skip(name, "weight is shared (tied) with other ops; merging would change them too")
            return 0
        if params.has_attr(gm, adapter_names(storage.target)["correction"]) and not self.unload:
            ctx.skip(name, "holds merged adapters already: lora-unmerge first, or unload=true")
            return 0
        active = [a for a in layer.adapters if layer.fixed or a.gate != 0.0]
        if not active and not self.unload:
            ctx.skip(name, "no active adapter")
            return 0
        w = tensor(gm, storage.target)
        steps, norms = fold_steps(gm, active, w.t() if transposed else w)
        names = adapter_names(storage.target)
        if self.unload:
            params.set_tensor(gm, storage.target, fold_rounded(w, steps, transposed))
            self._replace_dense(ctx, layer, "unload")
            for a in layer.adapters:
                for tname in (a.a, a.b, a.magnitude):
                    if tname:
                        params.remove_if_unused(gm, tname)
            ctx.site(name, form="unloaded", adapters=[a.name for a in active], bytes_kept=0)
            return 0
        merged, correction = fold(w, steps, transposed)
        params.set_tensor(gm, storage.target, merged)
        dropout = layer.dropout
        remaining = [a for a in layer.adapters if a not in active]
        if layer.fixed:
            (a,) = active
            params.add_tensor(gm, names["merged"], torch.tensor([a.scale, dropout], dtype=torch.float64,
                                                                device=w.device))
        else:
            for order, a in enumerate(active):
                record = [a.scale, a.gate, a.id, order, dropout, float(layer.index is not None),
                          layer.adapters.index(a)]
                own = adapter_names(storage.target, a.name)
                params.add_tensor(gm, own["folded"], torch.tensor(record, dtype=torch.float64, device=w.device))
                if a.dora:
                    params.add_tensor(gm, own["norm"], norms[a.name].to(w.device))
        params.add_tensor(gm, names["correction"], correction)
        if remaining:
            layer.adapters = remaining
            write_layer(gm, layer, pass_name=self.name, rule="merge")
        else:
            self._replace_dense(ctx, layer, "merge")
        bytes_kept = correction.numel() * correction.element_size()
        for a in active:
            for tname in (a.a, a.b, a.magnitude):
                if tname:
                    to_buffer(gm, tname)
                    t = get_attr_value(gm, tname)
                    bytes_kept += t.numel() * t.element_size()
        ctx.site(name, form="undoable", adapters=[a.name for a in active],
                 correction_dtype=str(correction.dtype).replace("torch.", ""),
                 nonzero_corrections=int(correction.count_nonzero()), bytes_kept=bytes_kept,
                 **({"still_switchable": [a.name for a in remaining]} if remaining else {}))
        return bytes_kept

    def _replace_dense(self, ctx, layer: LoraLayer, rule: str) -> None:
        gm = ctx.gm
        new = dense_node(gm, layer.node, layer.x, layer.weight, layer.bias, pass_name=self.name, rule=rule)
        replace_node(gm, layer.node, new)
        if layer.adapter_input is not None and not layer.adapter_input.users:
            gm.graph.erase_node(layer.adapter_input)
        if layer.weight.op == "call_function" and not layer.weight.users:
            gm.graph.erase_node(layer.weight)

    def _drop_records(self, ctx) -> None:
        """unload on a program merged earlier: drop every merge record and the adapter tensors it kept."""
        gm = ctx.gm
        in_use = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
        dropped = {}
        for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
            if is_lora_tensor(name) and name not in in_use and name != INDEX_BUFFER:
                if params.remove_if_unused(gm, name):
                    dropped.setdefault(layer_of(name), []).append(name.rsplit(".", 1)[-1])
        for layer, names in dropped.items():
            if any(n.startswith(("lora_merged", "lora_folded", "lora_correction")) or "_lora_" in n for n in names):
                ctx.site(layer, form="unloaded", dropped=sorted(names), bytes_kept=0)
