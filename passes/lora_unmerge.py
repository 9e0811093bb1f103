"""`lora-unmerge` — undo `lora-merge`: restore the base weight bit for bit and put the adapters back.

    W = ord⁻¹( ord(round(F⁻¹(W'))) + c )      (F: the folded adapters' maps, c: the stored ulp correction;
                                                rewriter/lora_fold.py)

Graph, before → after (rule "unmerge"):

    y = aten.linear(x, W', b)                   y = rewrite.lora_linear(x, W, b, A, B, s)       (fixed form)
    y = aten.addmm(b, x, W'_io)                 y = rewrite.lora_linear(x, aten.t(W_io), b, A, B, s)
    y = aten.linear(x, W', b)                   y = rewrite.multi_lora_linear(x, W, b, None, [A…], …)
    y = rewrite.multi_lora_linear(x, W', …)     the same op with the folded adapters back in their places

A, B (and DoRA magnitudes) become trainable Parameters again, with their scales, gates, batch ids, dropout and
row-index wiring as they were; the merge records, DoRA norms and the correction are removed.
Contract: exact (the base weights come back bit for bit; the function equals the merged one up to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter import params
from rewriter.adapters import (LORA_OPS, Adapter, adapter_names, add_dropout, index_node, layer_from_site,
                               layer_tensors, lora_layers, merged_records, read_layer, tensor, write_layer)
from rewriter.lora_fold import delta, dora_step, plain_step, unfold
from rewriter.matchers.linear import LINEAR_OPS, find_linears
from rewriter.pass_base import Contract, Pass


@dataclass(frozen=True)
class LoraUnmergePass(Pass):
    name = "lora-unmerge"
    contract = Contract.EXACT
    target_ops = LINEAR_OPS + LORA_OPS
    summary = "restore merged LoRA/DoRA layers: base weights bit-exact, adapters trainable again"

    def should_run(self, ctx):
        if not merged_records(ctx.gm):
            return "no merged LoRA layers (nothing to unmerge)"
        return None

    def run(self, ctx) -> None:
        gm = ctx.gm
        layers = [(s.name, s.weight_name, s) for s in find_linears(gm)]
        layers += [(layer.name, layer.storage[0].target, layer.node) for layer in lora_layers(gm)
                   if layer.weight is not None]
        for name, weight_name, found in ctx.progress(layers, "unmerging adapters"):
            names = adapter_names(weight_name)
            folded = layer_tensors(gm, weight_name, "folded")
            if params.has_attr(gm, names["merged"]):
                self._unmerge_fixed(ctx, found, names)
            elif folded:
                self._unmerge_switchable(ctx, found, weight_name, folded)

    def _restore_weight(self, gm, layer, steps, names) -> None:
        storage, transposed = layer.storage
        correction = tensor(gm, names["correction"])
        params.set_tensor(gm, storage.target, unfold(tensor(gm, storage.target), steps, correction, transposed))
        params.remove_if_unused(gm, names["correction"])

    def _unmerge_fixed(self, ctx, site, names) -> None:
        gm = ctx.gm
        scale, dropout = (float(v) for v in tensor(gm, names["merged"]))
        layer = layer_from_site(gm, site, pass_name=self.name, rule="unmerge")
        self._restore_weight(gm, layer, [plain_step(delta(tensor(gm, names["A"]), tensor(gm, names["B"]), scale))],
                             names)
        params.remove_if_unused(gm, names["merged"])
        for key in ("A", "B"):
            params.make_trainable(gm, names[key], True)
        layer.adapters.append(Adapter("default", names["A"], names["B"], scale))
        layer.fixed = True
        add_dropout(gm, layer, dropout, pass_name=self.name, rule="unmerge")
        write_layer(gm, layer, pass_name=self.name, rule="unmerge")
        ctx.site(site.name, form="fixed")

    def _unmerge_switchable(self, ctx, found, weight_name, folded: dict[str, str]) -> None:
        gm = ctx.gm
        records = []
        for adapter_name, record_name in folded.items():
            scale, gate, id_, order, dropout, has_index, slot = (float(v) for v in tensor(gm, record_name))
            own = adapter_names(weight_name, adapter_name)
            magnitude = own["magnitude"] if params.has_attr(gm, own["magnitude"]) else None
            records.append((int(order), int(slot), dropout, bool(has_index),
                            Adapter(adapter_name, own["A"], own["B"], scale, gate, int(id_), magnitude), own))
        records.sort(key=lambda r: r[0])
        steps = []
        for *_, a, own in records:
            d = delta(tensor(gm, a.a), tensor(gm, a.b), a.scale)
            steps.append(dora_step(d, tensor(gm, a.magnitude), tensor(gm, own["norm"]), a.gate) if a.dora
                         else plain_step(d, a.gate))
        if hasattr(found, "rule"):   # a dense site: the whole layer was merged
            layer = layer_from_site(gm, found, pass_name=self.name, rule="unmerge")
        else:                        # a switchable op still holding the adapters that were inactive
            layer = read_layer(found)
        self._restore_weight(gm, layer, steps, adapter_names(weight_name))
        for order, slot, dropout, has_index, a, own in sorted(records, key=lambda r: r[1]):
            for key in ("folded", "norm"):
                if params.has_attr(gm, own[key]):
                    params.remove_if_unused(gm, own[key])
            for name in (a.a, a.b, a.magnitude):
                if name:
                    params.make_trainable(gm, name, True)
            layer.adapters.insert(min(slot, len(layer.adapters)), a)
            add_dropout(gm, layer, dropout, pass_name=self.name, rule="unmerge")
            if has_index:
                layer.index = index_node(gm)
        layer.fixed = False
        write_layer(gm, layer, pass_name=self.name, rule="unmerge")
        ctx.site(layer.name, form="switchable", adapters=[r[4].name for r in records])
