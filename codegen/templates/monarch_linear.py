"""Monarch linear as two block GEMMs: y = act(P₂·L·P₁·R·x + b) + residual, both permutations in the addressing.

Layout (rewriter/ops/monarch_linear.py): w1 (b, q, p) = R, w2 (b, s, q) = L, x zero-padded to b·p,
h[k, j] = Σ_r w1[k, j, r]·x[k·p + r];  P₁: g[c, i] = h_flat[i·b + c] (h_flat[k·q + j] = h[k, j]);
y_ext[s'·b + c] = Σ_i w2[c, s', i]·g[c, i];  y = y_ext[:m] + bias.

Both factors are block-diagonal GEMMs of the GEMM template (codegen/templates/gemm.py):

    stage 1   g = P₁(R·x)     NB = b blocks of (rows × p)·(p × q); OUT 1 stores entry f = k·q + j of h at
                              g's column (f mod b)·q + ⌊f/b⌋, i.e. g[c, i] laid out block after block
    stage 2   y = P₂(L·g)     NB = b blocks of (rows × q)·(q × s) reading g[c, ·] as block c's input; OUT 2
                              stores output s' of block c at column s'·b + c (truncated to m), after the
                              epilogue: + bias, activation (GELU), + residual — an FFN's up/down projection's
                              pointwise ops, folded as in the LoRA template.

Every product is computed once (the earlier single kernel recomputed the first factor for every output tile):
FLOPs 2·rows·q·b·(p + s), the FLOP ratio of the factorisation; memory: x and y once, g written and read once
(rows·b·q values). At b = √n (p = q = s = 64 for n = 4096) both stages are memory-bound and the pair costs ~4
passes over a rows × n matrix against dense's weight-bound GEMM. The zero padding of x is the K-tail mask.

Candidates for codegen.select: the pair in each GEMM tile configuration (one configuration per candidate, each
stage's tile clamped to its own shape), and the aten path (the op's bmm formula, then the epilogue).

Precision (codegen.runtime.mma_upcast): fp16 (and bf16 on a GPU) operands go to tl.dot as loaded (tensor-core MMA,
fp32 accumulation); the one rounded intermediate is g, stored in the input dtype (the reference's bmm returns h,
hence g, in fp16 too: the same rounding); fp32 inputs use exact IEEE dots and an fp32 g. The accumulator, bias
add, activation and residual add stay fp32 until the final store.
"""
from __future__ import annotations

import torch

from codegen.epilogue import ACTIVATIONS, epilogue
from codegen.select import Candidate
from codegen.templates import gemm
from codegen.templates.gemm import Tiles


def supported(x, w1, w2, bias, residual=None) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} has no kernel"
    for t in (w1, w2, bias, residual):
        if t is not None and t.dtype != x.dtype:
            return "mixed dtypes"
    return None


def launch(x, w1, w2, bias, out_features: int, activation: str = "none", residual: torch.Tensor | None = None,
           blocks: Tiles | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The factored path of rewrite::monarch_linear, then the epilogue act(·) + residual (residual: broadcastable
    to the output). `blocks`: the GEMM tiles (each stage clamps them; default: the heuristic first candidate).
    `out` (rows, out_features), any strides, gets the result."""
    nb, q, p = w1.shape
    s = w2.shape[1]
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    rows = x2.shape[0]
    m = int(out_features)
    y = torch.empty(rows, m, dtype=x.dtype, device=x.device) if out is None else out
    res2 = residual.broadcast_to(*x.shape[:-1], m).reshape(rows, m) if residual is not None else None
    if rows and m:
        g = torch.empty(rows, nb * q, dtype=gemm.intermediate_dtype(x.dtype), device=x.device)
        gemm.launch(x2, w1, g, M_out=nb * q, out_mode=gemm.OUT_P1,
                    tiles=blocks.clamp(rows, q, p) if blocks else None)
        gemm.launch(g, w2, y, M_out=m, out_mode=gemm.OUT_P2, bias=bias, activation=ACTIVATIONS[activation],
                    residual=res2, tiles=blocks.clamp(rows, s, q) if blocks else None)
    return y.reshape(*x.shape[:-1], m) if out is None else out


def reference(x, w1, w2, bias, out_features, dense=None, threshold=0, activation="none", residual=None):
    """rewrite::monarch_linear's reference (its pre-merged dense path included), then the epilogue."""
    from rewriter.ops import monarch_linear as op
    return epilogue(op.reference(x, w1, w2, bias, out_features, dense, threshold), activation, residual)


def aten(x, w1, w2, bias, out_features, activation="none", residual=None):
    """The op's own CPU/CUDA path (bmm's with the bias fused into the P₂ copy), then the epilogue."""
    from rewriter.ops import monarch_linear as op
    return epilogue(op.factored(x, w1, w2, bias, out_features), activation, residual)


def candidates(x, w1, w2, bias, out_features, activation="none", residual=None):
    args = (x, w1, w2, bias, out_features, activation, residual)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    nb, q, p = w1.shape
    tiles = gemm.candidate_tiles(rows, max(q, w2.shape[1]), max(p, q), x.dtype)
    out = [Candidate(f"triton[{t.name}]", "triton", lambda t=t: launch(*args, blocks=t)) for t in tiles]
    out.append(Candidate("aten", "aten", lambda: aten(*args)))
    return out
