"""`lora-merge` — fold adapters into the base weight: W' = W + s·B·A, computed in float64, rounded once.

Graph, before → after (rule "merge"):

    y = rewrite.lora_linear(x, W, b, A, B, s)       y = aten.linear(x, W', b)
    y = rewrite.lora_linear(x, aten.t(W_io), b, …)  y = aten.addmm(b, x, W'_io)   (GPT-2 Conv1D layout restored)

A and B stay in the program as buffers, with `lora_merged` = [s, dropout] and an integer `lora_correction`
(see rewriter/adapters.py) so that `lora-unmerge` restores W bit for bit — PEFT's unmerge subtracts B·A again
and drifts in bf16 (PEFT #1388, #2502). The correction is mostly zeros and costs 1 byte per weight element
when it fits in int8 (it does unless s·B·A dwarfs W).

Contract: exact — the merged layer differs from the adapter layer only by rounding W + s·B·A once.
A weight shared with other ops (tied) is not merged: the merge would change them too (reported per site).
Merging a program with no adapters is a no-op with a message.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rewriter import params
from rewriter.adapters import LORA_OP, adapter_names, delta, layer_of, merge_weight, shared_readers
from rewriter.ir import get_attr_value, insert_call, replace_node
from rewriter.pass_base import Contract, Pass

aten = torch.ops.aten


@dataclass(frozen=True)
class LoraMergePass(Pass):
    name = "lora-merge"
    contract = Contract.EXACT
    target_ops = (LORA_OP,)
    summary = "fold LoRA adapters into the base weights (W + s·B·A in fp64, rounded once); undo with lora-unmerge"

    def should_run(self, ctx):
        reason = super().should_run(ctx)
        if reason is not None and any(n.endswith("lora_merged") for n, _ in ctx.gm.named_buffers()):
            return "already merged: nothing to merge"
        return reason

    def run(self, ctx) -> None:
        gm = ctx.gm
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == LORA_OP]
        for node in ctx.progress(nodes, "merging adapters"):
            x, w_node, bias, a_node, b_node, scale = node.args[:6]
            adapter_input = node.args[6] if len(node.args) > 6 else None
            storage, transposed = (w_node.args[0], True) if w_node.op == "call_function" else (w_node, False)
            weight_name = storage.target
            layer = layer_of(weight_name)
            if storage.op != "get_attr" or a_node.op != "get_attr" or b_node.op != "get_attr":
                ctx.skip(layer, "weight or adapter is not a stored tensor")
                continue
            if shared_readers(gm, weight_name, node):
                ctx.skip(layer, "weight is shared (tied) with other ops; merging would change them too")
                continue
            names = adapter_names(weight_name)
            a = get_attr_value(gm, a_node.target).detach()
            b = get_attr_value(gm, b_node.target).detach()
            w = get_attr_value(gm, weight_name).detach()
            d = delta(a, b, float(scale))
            merged, correction = merge_weight(w, d.t() if transposed else d)
            params.set_tensor(gm, weight_name, merged)
            new = self._dense_node(gm, node, x, w_node, storage, bias, transposed)
            replace_node(gm, node, new)
            if adapter_input is not None and not adapter_input.users:
                gm.graph.erase_node(adapter_input)
            if transposed and not w_node.users:
                gm.graph.erase_node(w_node)
            for key, node_, value in (("A", a_node, a), ("B", b_node, b)):
                params.remove_if_unused(gm, node_.target)
                params.add_tensor(gm, names[key], value)
            dropout = float(adapter_input.args[1]) if adapter_input is not None else 0.0
            params.add_tensor(gm, names["merged"], torch.tensor([float(scale), dropout], dtype=torch.float64,
                                                                 device=w.device))
            params.add_tensor(gm, names["correction"], correction)
            ctx.site(layer, correction_dtype=str(correction.dtype).replace("torch.", ""),
                     nonzero_corrections=int(correction.count_nonzero()))

    def _dense_node(self, gm, node, x, w_node, storage, bias, transposed):
        rule = "merge"
        x_val = x.meta.get("val")
        if transposed and x_val is not None and x_val.ndim == 2:
            if bias is not None:
                return insert_call(gm, node, aten.addmm.default, (bias, x, storage), pass_name=self.name,
                                   rule=rule, replaces=node)
            return insert_call(gm, node, aten.mm.default, (x, storage), pass_name=self.name, rule=rule,
                               replaces=node)
        return insert_call(gm, node, aten.linear.default, (x, w_node, bias), pass_name=self.name, rule=rule,
                           replaces=node)
