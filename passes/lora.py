"""`lora` — insert low-rank adapters (LoRA, Hu et al. 2021; DoRA, Liu et al. 2024) on linear layers.

    y = x·Wᵀ + b + s · (x·Aᵀ)·Bᵀ,    A: (r, in), B: (out, r),    s = α / r   (rsLoRA: s = α / √r)
    DoRA: W_eff = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row,  m initialised to ‖W‖_row (so W_eff = W while B = 0)

Graph, before → after (rule "insert-<matcher rule>"):

    y = aten.linear(x, W, b)            y = rewrite.lora_linear(x, W, b, A, B, s)                (fixed form)
    y = aten.addmm(b, x, W_io)          y = rewrite.lora_linear(x, aten.t(W_io), b, A, B, s)     (GPT-2 Conv1D)
    y = aten.linear(x, W, b)            y = rewrite.multi_lora_linear(x, W, b, None, [A], [B], [m?], "NAME", …)
                                                                              (named adapters, DoRA: switchable)
    y = rewrite.lora_linear(…)          y = rewrite.multi_lora_linear(x, W, b, None, [A, A₂], [B, B₂], …)
                                                                              (a second adapter on a layer)
    y = rewrite.monarch_linear(x, …)    y = rewrite.multi_lora_linear(x, None, None, monarch(x, …), [A], [B], …)
        (also shiftadd_linear, blockdiag_linear, lowrank_linear: adapters on compressed layers, QLoRA-style)

`name=NAME` adds the adapter under that name; several can sit on one layer (each a switchable op; `lora-select`
and `rewriter.lora_runtime.set_adapters` choose which are active). Without `name` the adapter is "default" and a
plain dense layer gets the fixed form (what the fused LoRA kernel lowers). New adapters are active.

Initialisations (all leave the function unchanged, so the contract is exact):
    zeros     A ~ kaiming-uniform(a=√5) as nn.Linear, B = 0           (PEFT's default)
    gaussian  A ~ N(0, 1/r), B = 0
    pissa     W = U·S·Vᵀ; B = U_r·√S_r / √s, A = √S_r·V_rᵀ / √s, W ← W − s·B·A (computed in fp32, rounded once)
              (PiSSA, Meng et al. 2024: the principal part trains, the residual stays frozen)

Every other parameter of the program is frozen (requires_grad=False), as PEFT does; adapters (A, B, m) are the
trainable Parameters (`freeze_base=false` leaves the other parameters as they were). With `dropout` > 0 the
adapters read dropout(x) — the program is then built for training (dropout is active when it runs); `lora-merge`
removes it.

`adapter=DIR` loads a Hugging Face PEFT LoRA or DoRA adapter (adapter_config.json + adapter_model.safetensors):
the layers it names get its A, B, scale (rank, alpha, rsLoRA and per-module patterns from its config) and
magnitudes. Loading changes the function on purpose: the contract is then semantic.

Targets: `targets` is a regex searched in layer names (e.g. "attn\\.(q|v)$"); by default every linear and every
compressed layer except an LM head (a layer tied to, or as wide as, an embedding table). `exclude` removes matches.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from rewriter import params
from rewriter.adapters import (DEFAULT, INDEX_BUFFER, LORA_OPS, Adapter, ContractByOptions, LoraLayer,
                               adapter_names, add_dropout, check_name, index_node, is_lora_node, is_lora_tensor,
                               layer_from_site, layer_from_structured, lora_layers, read_layer, shared_readers,
                               structured_ops, write_layer)
from rewriter.errors import UserError
from rewriter.ir import get_attr_value
from rewriter.matchers.linear import LINEAR_OPS, LinearSite, find_linears, is_lm_head
from rewriter.peft_interop import match_layer, read_adapter
from rewriter.pass_base import Contract, Pass


def _contract(p) -> Contract:
    return Contract.SEMANTIC if p.adapter else Contract.EXACT


@dataclass(frozen=True)
class LoraPass(Pass):
    name = "lora"
    contract = ContractByOptions(Contract.EXACT, _contract)
    target_ops = LINEAR_OPS + LORA_OPS + tuple(structured_ops())
    summary = "insert LoRA / DoRA adapters (B = 0 or PiSSA), named, on linear and compressed layers; trainable"
    option_keys = {"adapter_name": "name"}

    rank: int = 8
    alpha: float = 16.0
    targets: str = ""
    exclude: str = ""
    rslora: bool = False
    dropout: float = 0.0
    init: Literal["zeros", "gaussian", "pissa"] = "zeros"
    seed: int = 0
    freeze_base: bool = True
    adapter: str = ""
    adapter_name: str = ""      # spec key `name`
    dora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.alpha):
            raise ValueError("alpha must be a finite number")
        if self.adapter_name:
            check_name(self.adapter_name)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def named(self) -> str:
        """The adapter's name ("default" when none is given)."""
        return self.adapter_name or DEFAULT

    # ---- candidates -------------------------------------------------------------------------------------------
    def _candidates(self, ctx) -> list[tuple[str, object]]:
        """(layer name, what to build on) in graph order: an existing LoRA op node, a linear site, or a structured
        op node. Layers are read when their turn comes: rewriting one changes the inputs of the next."""
        gm = ctx.gm
        keep = lambda name: (not self.targets or re.search(self.targets, name)) and \
            not (self.exclude and re.search(self.exclude, name))  # noqa: E731
        existing = {layer.node: layer for layer in lora_layers(gm)}
        bases = {layer.base for layer in existing.values() if layer.base is not None}
        structured = structured_ops()
        sites = {s.node: s for s in find_linears(gm, self.targets or None, self.exclude or None)}
        out = []
        for node in gm.graph.nodes:
            if node in existing:
                if keep(existing[node].name):
                    out.append((existing[node].name, node))
            elif node in sites:
                site = sites[node]
                if self.targets or self.adapter or not is_lm_head(gm, site):
                    out.append((site.name, site))
            elif node.op == "call_function" and node.target in structured and node not in bases:
                name = layer_from_structured(node).name
                if keep(name):
                    out.append((name, node))
        return out

    def run(self, ctx) -> None:
        gm = ctx.gm
        loaded = read_adapter(self.adapter) if self.adapter else None
        candidates = self._candidates(ctx)
        if loaded is not None:
            candidates = [(n, c) for n, c in candidates if match_layer(loaded, n) is not None]
            if not candidates:
                raise UserError(f"lora: no layer of the model matches the adapter in {self.adapter} "
                                f"(it names {', '.join(list(loaded)[:4])} ...)")
        if not candidates:
            layers = [s.name for s in find_linears(gm)]
            raise UserError(f'lora: no linear layer matches targets="{self.targets}"; layers are: '
                            f"{', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}")
        gen = torch.Generator().manual_seed(self.seed)
        ids = {a.name: a.id for layer in lora_layers(gm) for a in layer.adapters if a.id >= 0}
        batch = params.has_attr(gm, INDEX_BUFFER) and bool(ids)
        new_id = ids.get(self.named, max(ids.values(), default=-1) + 1) if batch else -1
        for name, candidate in ctx.progress(candidates, "inserting adapters"):
            if isinstance(candidate, LinearSite):
                layer = None
            elif is_lora_node(candidate):
                layer = read_layer(candidate)
            else:
                layer = layer_from_structured(candidate)
            reason = self._skip_reason(gm, candidate, layer)
            if reason:
                ctx.skip(name, reason)
                continue
            if layer is None:
                rule = f"insert-{candidate.rule}"
                layer = layer_from_site(gm, candidate, pass_name=self.name, rule=rule)
                layer.fixed = not self.adapter_name and not self.dora
            else:
                rule = "insert-structured" if layer.node is layer.base else "add-adapter"
            built = self._build(ctx, layer, name, loaded, gen)
            if built is None:
                continue
            adapter, info = built
            adapter.id = new_id
            if batch:
                layer.index = index_node(gm)
            layer.adapters.append(adapter)
            add_dropout(gm, layer, self.dropout, pass_name=self.name, rule=rule)
            write_layer(gm, layer, pass_name=self.name, rule=rule)
            ctx.site(name, adapter=self.named, form="fixed" if layer.fixed else "switchable", **info)
        if self.freeze_base:
            for pname, p in gm.named_parameters():
                if not is_lora_tensor(pname):
                    p.requires_grad_(False)

    def _skip_reason(self, gm, candidate, layer: LoraLayer | None) -> str | None:
        if layer is not None:
            if layer.find(self.named) is not None:
                return f'already has an adapter named "{self.named}"'
            if self.dora and layer.weight is None:
                return "DoRA needs a dense weight (this layer is compressed)"
            if self.init == "pissa" and not self.adapter and layer.adapters:
                return "PiSSA rewrites the base weight: only on a layer without adapters"
            return None
        names = adapter_names(candidate.weight_name)
        if params.has_attr(gm, names["merged"]) or params.has_attr(gm, names["correction"]):
            return "merged adapters: run lora-unmerge first"
        return None

    def _build(self, ctx, layer: LoraLayer, name: str, loaded, gen):
        """(the new Adapter, site info) after creating its tensors, or None (skipped, reported)."""
        gm = ctx.gm
        names = adapter_names(layer.key, self.named)
        for key in ("A", "B", "magnitude"):
            if params.has_attr(gm, names[key]):
                ctx.skip(name, f"tensor {names[key]} exists already")
                return None
        storage, transposed = layer.storage
        weight = None if storage is None else params_tensor(gm, storage.target, transposed)
        like = weight if weight is not None else torch.empty(0, dtype=layer.x.meta["val"].dtype,
                                                              device=params_tensor(gm, layer.key, False).device)
        in_f = layer.x.meta["val"].shape[-1]
        out_f = weight.shape[0] if weight is not None else layer.base.meta["val"].shape[-1]
        scale, magnitude, init = self.scale, None, self.init
        if loaded is not None:
            entry = loaded[match_layer(loaded, name)]
            a, b, scale = entry["A"], entry["B"], entry["scale"]
            if a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != a.shape[0]:
                raise UserError(f"lora: adapter for {name} has shapes A{list(a.shape)} B{list(b.shape)}, "
                                f"the layer is {in_f} → {out_f}")
            a, b = a.to(device=like.device, dtype=like.dtype), b.to(device=like.device, dtype=like.dtype)
            if entry.get("magnitude") is not None:
                if weight is None:
                    ctx.skip(name, "DoRA needs a dense weight (this layer is compressed)")
                    return None
                magnitude = entry["magnitude"].to(device=like.device, dtype=like.dtype)
            init = "adapter"
        else:
            rank = min(self.rank, in_f, out_f)
            if rank < 1:
                ctx.skip(name, "zero-sized layer")
                return None
            if self.init == "pissa":
                if weight is None:
                    ctx.skip(name, "PiSSA needs a dense weight (this layer is compressed)")
                    return None
                if shared_readers(gm, storage.target, layer.node):
                    ctx.skip(name, "weight is shared (tied) with other ops; PiSSA would change them too")
                    return None
                a, b, residual = self._pissa(weight, rank)
                params.set_tensor(gm, storage.target, residual.t().contiguous() if transposed else residual)
                weight = residual
            else:
                shape = weight if weight is not None else like.new_empty(()).expand(out_f, in_f)
                a, b = self._zero_init(shape, rank, gen)
            if self.dora:
                magnitude = torch.linalg.norm(weight.float() + scale * (b.float() @ a.float()), dim=1).to(like.dtype)
        params.add_tensor(gm, names["A"], a, trainable=True)
        params.add_tensor(gm, names["B"], b, trainable=True)
        if magnitude is not None:
            params.add_tensor(gm, names["magnitude"], magnitude.contiguous(), trainable=True)
        added = a.numel() + b.numel() + (magnitude.numel() if magnitude is not None else 0)
        adapter = Adapter(self.named, names["A"], names["B"], float(scale),
                          magnitude=names["magnitude"] if magnitude is not None else None)
        return adapter, {"rank": a.shape[0], "params_added": added, "init": init,
                         **({"dora": True} if magnitude is not None else {})}

    def _zero_init(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        """(A, B) for a layer with weight (out, in) (its shape, dtype and device; values unused)."""
        out_f, in_f = weight.shape
        if self.init == "gaussian":
            a = torch.randn(rank, in_f, generator=gen, device="cpu") / rank
        else:  # nn.Linear's kaiming_uniform(a=√5): U(−1/√in, 1/√in)
            bound = 1.0 / math.sqrt(in_f)
            a = (torch.rand(rank, in_f, generator=gen, device="cpu") * 2 - 1) * bound
        # drawn on the CPU (a seeded CPU generator: the same adapter on every device), stored beside the weight
        return (a.to(device=weight.device, dtype=weight.dtype),
                torch.zeros(out_f, rank, dtype=weight.dtype, device=weight.device))

    def _pissa(self, weight: torch.Tensor, rank: int):
        w = weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt() / math.sqrt(self.scale)
        b = u[:, :rank] * root
        a = root[:, None] * vh[:rank]
        residual = w - self.scale * (b @ a)
        return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype).contiguous()


def params_tensor(gm, name: str, transposed: bool) -> torch.Tensor:
    """A stored tensor (detached), as (out, in) when it is stored transposed."""
    t = get_attr_value(gm, name).detach()
    return t.t() if transposed else t
