"""Random models for fuzzing every pass: hypothesis strategies that build small `nn.Module`s no test was written for.

A model is a `ModelSpec` — data, so a failing example prints as something one can read and rebuild — and
`build(spec)` turns it into (module, example_args). The forward pass interprets the spec's steps in order; each step
reads earlier values (the graph input is value 0) and appends one, so the graphs are chains and DAGs:

    linear    aten.linear(x, W, b?)                       (out, in) weight, optional bias
    conv1d    aten.addmm(b, x2d, W)                       GPT-2's Conv1D: (in, out) weight
    conv      nn.Conv1d over the sequence axis             (not a linear layer: passes must leave it alone)
    ln        layer_norm          act   gelu / silu / relu          add   residual x + y (same width)
    softmax   softmax over the features, mid-graph
    attn      q/k/v/proj linears around attention in one of four forms:
              hand    softmax(q·kᵀ·scale)·v
              masked  causal masked_fill(−inf) before the softmax
              where   causal torch.where(mask, scores, −inf)
              sdpa    F.scaled_dot_product_attention (causal or not)

A value may feed several steps (fan-out) and any value may also be returned (a linear's output as a model output).
The input is features (B, T, d) or tokens (B, T) through an embedding; the head is none, a linear, or — for token
inputs — tied to the embedding table, optionally followed by softmax / log-softmax. `kind="single-linear"` is a
model that is one nn.Linear (its weight at the root, named "weight").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

WIDTHS = (4, 8, 12, 16, 24, 32)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ModelSpec:
    kind: str                      # "net" | "single-linear"
    inputs: str                    # "features" | "tokens"
    width: int                     # width of value 0 (features, or the embedding dim)
    steps: tuple                   # ((op, *args), ...), see the module docstring
    head: str = "none"             # "none" | "linear" | "tied"
    head_out: int = 0              # width of a linear head (vocabulary-like when large)
    head_norm: str = "none"        # "none" | "softmax" | "log_softmax"
    extra_outputs: tuple = ()      # value indices returned beside the head
    vocab: int = 0                 # token inputs: embedding rows
    batch: int = 2
    seq: int = 5
    dtype: str = "float32"
    seed: int = 0
    bias: bool = True              # single-linear only
    out_width: int = 0             # single-linear only

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D: y = addmm(b, x2d, W) with W stored (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.02)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, form: str, causal: bool, max_len: int):
        super().__init__()
        self.heads, self.form, self.causal = heads, form, causal
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        h = self.heads
        q, k, v = (f(x).view(b, t, h, c // h).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.form == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // h))
            if self.form == "masked":
                scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
            elif self.form == "where":
                scores = torch.where(self.mask[:t, :t], scores, torch.full_like(scores, float("-inf")))
            y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class RandomNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        if spec.inputs == "tokens":
            self.embed = nn.Embedding(spec.vocab, spec.width)
        self.layers = nn.ModuleList()
        widths = [spec.width]
        for step in spec.steps:
            op, src = step[0], step[1]
            w = widths[src]
            if op == "linear":
                layer, w = nn.Linear(w, step[2], bias=step[3]), step[2]
            elif op == "conv1d":
                layer, w = Conv1D(w, step[2]), step[2]
            elif op == "conv":
                layer = nn.Conv1d(w, w, 3, padding=1)
            elif op == "ln":
                layer = nn.LayerNorm(w)
            elif op == "attn":
                layer = Attention(w, step[2], step[3], step[4], spec.seq)
            else:
                layer = nn.Identity()
            self.layers.append(layer)
            widths.append(w)
        last = widths[-1]
        if spec.head == "linear":
            self.head = nn.Linear(last, spec.head_out, bias=False)

    def forward(self, x):
        spec = self.spec
        values = [self.embed(x) if spec.inputs == "tokens" else x]
        for layer, step in zip(self.layers, spec.steps):
            op, src = step[0], step[1]
            v = values[src]
            if op == "conv":
                y = layer(v.transpose(1, 2)).transpose(1, 2)
            elif op == "act":
                y = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[step[2]](v)
            elif op == "add":
                y = v + values[step[2]]
            elif op == "softmax":
                y = torch.softmax(v, dim=-1)
            else:
                y = layer(v)
            values.append(y)
        out = values[-1]
        if spec.head == "linear":
            out = self.head(out)
        elif spec.head == "tied":
            out = F.linear(out, self.embed.weight)
        if spec.head_norm == "softmax":
            out = torch.softmax(out, dim=-1)
        elif spec.head_norm == "log_softmax":
            out = torch.log_softmax(out, dim=-1)
        if spec.extra_outputs:
            return (out,) + tuple(values[i] for i in spec.extra_outputs)
        return out


def fuzz_device() -> torch.device:
    """Where fuzzed models live: REWRITE_TEST_DEVICE (`make test-gpu` sets cuda), default the CPU."""
    return torch.device(os.environ.get("REWRITE_TEST_DEVICE", "cpu"))


def build(spec: ModelSpec) -> tuple[nn.Module, tuple]:
    """(model in eval mode, the spec's dtype and on fuzz_device(), example args), deterministic in spec.seed
    (weights and inputs are drawn on the CPU, then moved)."""
    torch.manual_seed(spec.seed)
    if spec.kind == "single-linear":
        model = nn.Linear(spec.width, spec.out_width, bias=spec.bias)
    else:
        model = RandomNet(spec)
    model = model.to(spec.torch_dtype).eval()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    if spec.kind == "net" and spec.inputs == "tokens":
        x = torch.randint(spec.vocab, (spec.batch, spec.seq), generator=gen)
    else:
        x = torch.randn(spec.batch, spec.seq, spec.width, generator=gen).to(spec.torch_dtype)
    device = fuzz_device()
    return model.to(device), (x.to(device),)


@st.composite
def model_specs(draw, dtypes=DTYPES, max_steps: int = 6) -> ModelSpec:
    """A random ModelSpec (see the module docstring)."""
    seed = draw(st.integers(0, 2**16))
    dtype = str(draw(st.sampled_from(dtypes))).replace("torch.", "")
    batch, seq = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([3, 5, 8]))
    if draw(st.integers(0, 9)) == 0:
        return ModelSpec("single-linear", "features", draw(st.sampled_from(WIDTHS)), (), dtype=dtype, seed=seed,
                         bias=draw(st.booleans()), out_width=draw(st.sampled_from(WIDTHS)), batch=batch, seq=seq)
    inputs = draw(st.sampled_from(["features", "tokens"]))
    width = draw(st.sampled_from(WIDTHS))
    widths = [width]
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        # recent values are likelier sources (chains), any earlier one is possible (fan-out, skips)
        src = draw(st.one_of(st.just(len(widths) - 1), st.integers(0, len(widths) - 1)))
        w = widths[src]
        op = draw(st.sampled_from(["linear", "linear", "linear", "conv1d", "conv", "ln", "act", "add", "attn",
                                   "softmax"]))
        if op in ("linear", "conv1d"):
            out = draw(st.sampled_from(WIDTHS))
            step = (op, src, out, draw(st.booleans())) if op == "linear" else (op, src, out)
            widths.append(out)
        elif op == "act":
            step = (op, src, draw(st.sampled_from(["gelu", "silu", "relu"])))
            widths.append(w)
        elif op == "add":
            partners = [i for i, wi in enumerate(widths) if wi == w and i != src]
            if not partners:
                continue
            step = (op, src, draw(st.sampled_from(partners)))
            widths.append(w)
        elif op == "attn":
            heads = draw(st.sampled_from([h for h in (1, 2, 4) if w % h == 0]))
            form = draw(st.sampled_from(["hand", "masked", "where", "sdpa"]))
            causal = form in ("masked", "where") or (form == "sdpa" and draw(st.booleans()))
            step = (op, src, heads, form, causal)
            widths.append(w)
        else:
            step = (op, src)
            widths.append(w)
        steps.append(step)
    if not steps:
        steps.append(("linear", 0, width, True))
        widths.append(width)
    last = widths[-1]
    heads = ["none", "linear"] + (["tied"] if inputs == "tokens" and last == width else [])
    head = draw(st.sampled_from(heads))
    vocab = draw(st.sampled_from([40, 64, 96])) if inputs == "tokens" else 0
    head_out = (vocab or draw(st.sampled_from([40, 64]))) if head == "linear" else 0
    head_norm = draw(st.sampled_from(["none", "softmax", "log_softmax"])) if head != "none" else "none"
    extra = tuple(sorted(set(draw(st.lists(st.integers(1, len(steps)), max_size=2)))))
    extra = tuple(i for i in extra if i < len(steps))   # the last value is the head's input, returned anyway
    return ModelSpec("net", inputs, width, tuple(steps), head, head_out, head_norm, extra, vocab, batch, seq,
                     dtype, seed)
