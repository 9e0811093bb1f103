"""`lora` — insert low-rank adapters (LoRA, Hu et al. 2021) on linear layers.

    y = x·Wᵀ + b + s · (x·Aᵀ)·Bᵀ,    A: (r, in), B: (out, r),    s = α / r   (rsLoRA: s = α / √r)

Graph, before → after (rule "insert"):

    y = aten.linear(x, W, b)            y = rewrite.lora_linear(x, W, b, A, B, s)
    y = aten.addmm(b, x, W_io)          y = rewrite.lora_linear(x, aten.t(W_io), b, A, B, s)   (GPT-2 Conv1D)

Initialisations (all leave the function unchanged, so the contract is exact):
    zeros     A ~ kaiming-uniform(a=√5) as nn.Linear, B = 0           (PEFT's default)
    gaussian  A ~ N(0, 1/r), B = 0
    pissa     W = U·S·Vᵀ; B = U_r·√S_r / √s, A = √S_r·V_rᵀ / √s, W ← W − s·B·A (computed in fp32, rounded once)
              (PiSSA, Meng et al. 2024: the principal part trains, the residual stays frozen)

Every other parameter of the program is frozen (requires_grad=False), as PEFT does; A and B are the trainable
Parameters (`freeze_base=false` leaves the other parameters as they were). With `dropout` > 0
the adapter reads dropout(x) — the program is then built for training (dropout is active when it runs);
`lora-merge` removes it.

`adapter=DIR` loads a Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors): the
layers it names get its A, B and scale (rank, alpha, rsLoRA and per-module patterns come from its config).

Targets: `targets` is a regex searched in layer names (e.g. "attn\\.(q|v)$"); by default every linear except an
LM head (a layer tied to, or as wide as, an embedding table). `exclude` removes matches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from rewriter import params
from rewriter.adapters import adapter_names, build_lora_node, shared_readers
from rewriter.errors import UserError
from rewriter.ir import replace_node
from rewriter.matchers.linear import LINEAR_OPS, find_linears, is_lm_head
from rewriter.peft_interop import match_layer, read_adapter
from rewriter.pass_base import Contract, Pass


@dataclass(frozen=True)
class LoraPass(Pass):
    name = "lora"
    contract = Contract.EXACT
    target_ops = LINEAR_OPS
    summary = "insert LoRA adapters (B = 0 or PiSSA) on linear layers; trainable"

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

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.alpha):
            raise ValueError("alpha must be a finite number")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def run(self, ctx) -> None:
        gm = ctx.gm
        adapters = read_adapter(self.adapter) if self.adapter else None
        sites = find_linears(gm, self.targets or None, self.exclude or None)
        if adapters is not None:
            sites = [s for s in sites if match_layer(adapters, s.name) is not None]
            if not sites:
                raise UserError(f"lora: no layer of the model matches the adapter in {self.adapter} "
                                f"(it names {', '.join(list(adapters)[:4])} ...)")
        elif not self.targets:
            sites = [s for s in sites if not is_lm_head(gm, s)]
        if not sites:
            layers = [s.name for s in find_linears(gm)]
            raise UserError(f'lora: no linear layer matches targets="{self.targets}"; layers are: '
                            f"{', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}")
        gen = torch.Generator().manual_seed(self.seed)
        for site in ctx.progress(sites, "inserting adapters"):
            names = adapter_names(site.weight_name)
            if params.has_attr(gm, names["A"]) or params.has_attr(gm, names["merged"]):
                ctx.skip(site.name, "already has an adapter")
                continue
            rank = min(self.rank, site.in_features, site.out_features)
            if rank < 1:
                ctx.skip(site.name, "zero-sized layer")
                continue
            weight = site.weight_out_in(gm)
            scale = self.scale
            if adapters is not None:
                loaded = adapters[match_layer(adapters, site.name)]
                a, b, scale = loaded["A"], loaded["B"], loaded["scale"]
                rank = a.shape[0]
                if a.shape[1] != site.in_features or b.shape != (site.out_features, rank):
                    raise UserError(f"lora: adapter for {site.name} has shapes A{list(a.shape)} B{list(b.shape)}, "
                                    f"the layer is {site.in_features} → {site.out_features}")
                a, b = a.to(weight.dtype), b.to(weight.dtype)
            elif self.init == "pissa":
                if shared_readers(gm, site.weight_name, site.node):
                    ctx.skip(site.name, "weight is shared (tied) with other ops; PiSSA would change them too")
                    continue
                a, b, residual = self._pissa(weight, rank)
                params.set_tensor(gm, site.weight_name, residual if site.layout == "out_in" else residual.t())
            else:
                a, b = self._zero_init(weight, rank, gen)
            params.add_tensor(gm, names["A"], a, trainable=True)
            params.add_tensor(gm, names["B"], b, trainable=True)
            new = build_lora_node(gm, site, names["A"], names["B"], scale, self.dropout,
                                  pass_name=self.name, rule=f"insert-{site.rule}")
            replace_node(gm, site.node, new)
            ctx.site(site.name, rank=rank, params_added=a.numel() + b.numel(),
                     init="adapter" if adapters is not None else self.init)
        if self.freeze_base:
            for name, p in gm.named_parameters():
                if not name.endswith(("lora_A", "lora_B")):
                    p.requires_grad_(False)

    def _zero_init(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        in_f = weight.shape[1]
        if self.init == "gaussian":
            a = torch.randn(rank, in_f, generator=gen, device="cpu") / rank
        else:  # nn.Linear's kaiming_uniform(a=√5): U(−1/√in, 1/√in)
            bound = 1.0 / math.sqrt(in_f)
            a = (torch.rand(rank, in_f, generator=gen, device="cpu") * 2 - 1) * bound
        # drawn on the CPU (a seeded CPU generator: the same adapter on every device), stored beside the weight
        return (a.to(device=weight.device, dtype=weight.dtype),
                torch.zeros(weight.shape[0], rank, dtype=weight.dtype, device=weight.device))

    def _pissa(self, weight: torch.Tensor, rank: int):
        w = weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt() / math.sqrt(self.scale)
        b = u[:, :rank] * root
        a = root[:, None] * vh[:rank]
        residual = w - self.scale * (b @ a)
        return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype).contiguous()
