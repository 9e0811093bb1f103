"""Length extrapolation: a tiny causal transformer trained at context 64 with softmax attention vs LSSA
(softplus attention), evaluated at 64 / 128 / 256 / 512, LSSA also with LSSAR re-weighting at evaluation.

    .venv/bin/python -m bench.length_extrapolation [--quick] [--seconds 90]

Synthetic task (needs content-based attention only, so no position embeddings — NoPE — and any length is in
distribution for the embeddings): a stream of random tokens (vocabulary 512) where about half the positions
repeat an earlier token; at every position the model says whether the current token appeared before. Softmax
attention to the single earlier match dilutes as the context grows (its weight falls like 1/T); LSSA's
log d · log Nᵢ scale is meant to keep it. Each model trains for the same wall time on the CPU (fixed seed).
This is a small, quick experiment, not the paper's language-model setting: read it as a smoke test of the
mechanism, and see the printed accuracies rather than trusting one number.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import machine, markdown_table
from rewriter.ops import softplus_attention as sp

VOCAB = 512


def batch(n: int, length: int, gen: torch.Generator):
    tokens = torch.randint(0, VOCAB, (n, length), generator=gen)
    copy = torch.rand(n, length, generator=gen) < 0.5
    for i in range(1, length):
        src = torch.randint(0, i, (n,), generator=gen)
        tokens[:, i] = torch.where(copy[:, i], tokens[torch.arange(n), src], tokens[:, i])
    seen = torch.zeros(n, length, dtype=torch.bool)
    for i in range(1, length):
        seen[:, i] = (tokens[:, :i] == tokens[:, i:i + 1]).any(1)
    return tokens, seen.long()


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.mode = "softmax"
        self.p = 15.0
        self.train_len = 0

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.mode == "softmax":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = sp.OP(q, k, v, None, True, self.mode == "lssar", self.p, self.train_len, 1e-6)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class Model(nn.Module):
    def __init__(self, dim=64, heads=4, layers=2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, 2)

    def set_mode(self, mode, p=15.0, train_len=0):
        for blk in self.blocks:
            blk.mode, blk.p, blk.train_len = mode, p, train_len

    def forward(self, tokens):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def train(mode: str, seconds: float, seed: int = 0):
    torch.manual_seed(seed)
    model = Model()
    model.set_mode(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens, target = batch(32, 64, gen)
        loss = F.cross_entropy(model(tokens).reshape(-1, 2), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return model, steps, float(loss.detach())


@torch.no_grad()
def evaluate(model, length: int, n: int = 16) -> tuple[float, float]:
    tokens, target = batch(n, length, torch.Generator().manual_seed(1234 + length))
    logits = model(tokens)
    loss = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1))
    acc = (logits.argmax(-1) == target).float().mean()
    return float(loss), float(acc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 s of training per model, lengths 64/256")
    ap.add_argument("--seconds", type=float, default=90.0, help="training wall time per model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seconds = 20.0 if args.quick else args.seconds
    lengths = [64, 256] if args.quick else [64, 128, 256, 512]
    runs = {}
    softmax_model, s_steps, s_loss = train("softmax", seconds)
    runs["softmax"] = (softmax_model, "softmax", {})
    lssa_model, l_steps, l_loss = train("lssa", seconds)
    runs["LSSA"] = (lssa_model, "lssa", {})
    runs["LSSAR p=3"] = (lssa_model, "lssar", {"p": 3.0})
    runs["LSSAR p=15, train_len=64"] = (lssa_model, "lssar", {"p": 15.0, "train_len": 64})
    rows, results = [], []
    for name, (model, mode, opts) in runs.items():
        model.set_mode(mode, **opts)
        row = [name]
        for length in lengths:
            loss, acc = evaluate(model, length)
            row += [loss, acc]
            results.append({"attention": name, "length": length, "loss": loss, "accuracy": acc})
        rows.append(row)
    headers = ["attention (eval)"] + [f"{k} @{n}" for n in lengths for k in ("loss", "acc")]
    print(f"length extrapolation, trained at 64 for {seconds:.0f} s each (softmax {s_steps} steps, final loss "
          f"{s_loss:.3f}; LSSA {l_steps} steps, final loss {l_loss:.3f}), {machine()}")
    print(markdown_table(headers, rows))
    print(json.dumps({"bench": "length_extrapolation", "machine": machine(), "seconds": seconds,
                      "steps": {"softmax": s_steps, "lssa": l_steps}, "results": results}))


if __name__ == "__main__":
    main()
