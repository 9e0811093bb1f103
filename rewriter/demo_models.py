"""Built-in demo models: small, deterministic (fixed seed), no downloads.

    demo:tiny-gpt   causal LM: token + position embedding, pre-LN blocks with hand-written softmax attention
                    (causal mask by masked_fill), GELU MLP, LM head tied to the token embedding
    demo:tiny-bert  encoder: embeddings, post-LN blocks with F.scaled_dot_product_attention, GELU MLP
    demo:tiny-vit   vision transformer: patch embedding, class token, pre-LN SDPA blocks, classifier head
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0


class GPTAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        h = self.heads
        q = self.q(x).view(b, t, h, c // h).transpose(1, 2)
        k = self.k(x).view(b, t, h, c // h).transpose(1, 2)
        v = self.v(x).view(b, t, h, c // h).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // h))
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class GPTBlock(nn.Module):
    def __init__(self, dim, heads, max_len):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = GPTAttention(dim, heads, max_len)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, dim=64, heads=4, layers=2, max_len=64):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, max_len) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class BertLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x):
        b, t, c = x.shape
        h = self.heads
        q = self.query(x).view(b, t, h, c // h).transpose(1, 2)
        k = self.key(x).view(b, t, h, c // h).transpose(1, 2)
        v = self.value(x).view(b, t, h, c // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        x = self.ln1(x + self.output(y))
        return self.ln2(x + self.mlp(x))


class TinyBert(nn.Module):
    def __init__(self, vocab=256, dim=64, heads=4, layers=2, max_len=64):
        super().__init__()
        self.word_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.ln_emb = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(BertLayer(dim, heads) for _ in range(layers))

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.ln_emb(self.word_emb(idx) + self.pos_emb(pos))
        for layer in self.layers:
            x = layer(x)
        return x


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x):
        b, t, c = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    def __init__(self, image=32, patch=8, channels=3, dim=64, heads=4, layers=2, classes=10):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Linear(channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        b, c, hgt, wid = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p)                  # b, c, H/p, W/p, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, 0]))


def _build(factory, inputs_fn):
    torch.manual_seed(SEED)
    model = factory().eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    return model, inputs_fn(gen)


DEMOS = {
    "tiny-gpt": (TinyGPT, lambda g: (torch.randint(0, 256, (2, 16), generator=g),)),
    "tiny-bert": (TinyBert, lambda g: (torch.randint(0, 256, (2, 16), generator=g),)),
    "tiny-vit": (TinyViT, lambda g: (torch.randn(2, 3, 32, 32, generator=g),)),
}


def demo_model(name: str):
    """(model, example_args) for a built-in demo."""
    from .errors import UserError, did_you_mean

    if name not in DEMOS:
        raise UserError(f'unknown demo model "demo:{name}"{did_you_mean(name, DEMOS)}; '
                        f"available: {', '.join('demo:' + n for n in DEMOS)}")
    return _build(*DEMOS[name])
