"""Block-diagonal linear (+ optional dense U) and low-rank linear on the GEMM template (codegen/templates/gemm.py).

rewrite::blockdiag_linear (rewriter/ops/blockdiag_linear.py): blocks (b, t, p), x zero-padded to b·p,
    h[k·t + j] = Σ_p blocks[k, j, p]·x[k·p + p]
    plain       y = h[:m] + bias            one block GEMM (NB = b, OUT 0) with the epilogue
    BlockDense  y = h·Uᵀ + bias  (U: (m, b·t))   h by the block GEMM, written once (rows · b·t values), then one
                                                 GEMM h·Uᵀ with the epilogue
rewrite::lowrank_linear: y = (x·Vᵀ)·Uᵀ + b        h = x·Vᵀ (rows · r), then h·Uᵀ with the epilogue

The intermediate is computed once per row (not once per output tile), so the factorisation's FLOP ratio shows up
as time; the zero padding of x is the K-tail mask.

Epilogue (as in the LoRA template), on the fp32 tile right before its store: + bias, activation (GELU erf/tanh),
+ residual (read at the stored columns with its own strides). A structured FFN's up-projection is followed by
GELU, its down-projection by the residual add: both fold in here.

Candidates for codegen.select: each GEMM tile configuration (both stages clamp it to their shapes) and the aten
path (the op's formula, then the epilogue).

Precision (codegen.runtime.mma_upcast): fp16 (and bf16 on a GPU) operands go to tl.dot as loaded — tensor-core
MMA, fp32 accumulation. BlockDense / low-rank: h is stored in the input dtype (the reference's bmm / F.linear in
fp16 returns h in fp16 too: the same rounding), fp32 where the dots are upcast. Plain block-diagonal: h + bias
(then the epilogue) is formed in fp32 and rounded once, at the store.
"""
from __future__ import annotations

import torch

from codegen.epilogue import ACTIVATIONS, epilogue
from codegen.select import Candidate
from codegen.templates import gemm
from codegen.templates.gemm import Tiles


def supported(x, *tensors) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} has no kernel"
    if any(t is not None and t.dtype != x.dtype for t in tensors):
        return "mixed dtypes"
    return None


def _clamp(tiles, rows, t, p):
    return tiles.clamp(rows, t, p) if tiles is not None else None


def launch(x, blocks, dense_u, bias, out_features: int, activation: str = "none",
           residual: torch.Tensor | None = None, tiles: Tiles | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The factored path of rewrite::blockdiag_linear, then the epilogue act(·) + residual (residual: broadcastable
    to the output); `out` (rows, out_features), any strides, gets the result."""
    nb, t, p = blocks.shape
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    rows = x2.shape[0]
    m = dense_u.shape[0] if dense_u is not None else int(out_features)
    y = torch.empty(rows, m, dtype=x.dtype, device=x.device) if out is None else out
    res2 = residual.broadcast_to(*x.shape[:-1], m).reshape(rows, m) if residual is not None else None
    epi = dict(bias=bias, activation=ACTIVATIONS[activation], residual=res2)
    if rows and m:
        if dense_u is None:
            gemm.launch(x2, blocks, y, M_out=m, tiles=_clamp(tiles, rows, t, p), **epi)
        else:
            h = torch.empty(rows, nb * t, dtype=gemm.intermediate_dtype(x.dtype), device=x.device)
            gemm.launch(x2, blocks, h, M_out=nb * t, tiles=_clamp(tiles, rows, t, p))
            gemm.launch(h, dense_u.unsqueeze(0), y, M_out=m, tiles=_clamp(tiles, rows, m, nb * t), **epi)
    return y.reshape(*x.shape[:-1], m) if out is None else out


def launch_lowrank(x, u, v, bias, activation: str = "none", residual: torch.Tensor | None = None,
                   tiles: Tiles | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The factored path of rewrite::lowrank_linear (V as one block: a view with a leading unit dim), then the
    epilogue."""
    return launch(x, v.unsqueeze(0), u, bias, u.shape[0], activation, residual, tiles=tiles, out=out)


def reference(x, blocks, dense_u, bias, out_features, dense=None, threshold=0, activation="none", residual=None):
    """rewrite::blockdiag_linear's reference (its pre-merged dense path included), then the epilogue."""
    from rewriter.ops import blockdiag_linear as op
    return epilogue(op.reference(x, blocks, dense_u, bias, out_features, dense, threshold), activation, residual)


def reference_lowrank(x, u, v, bias, dense=None, threshold=0, activation="none", residual=None):
    """rewrite::lowrank_linear's reference (its pre-merged dense path included), then the epilogue."""
    from rewriter.ops import lowrank_linear as op
    return epilogue(op.reference(x, u, v, bias, dense, threshold), activation, residual)


def _rows(x):
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def candidates(x, blocks, dense_u, bias, out_features, activation="none", residual=None):
    args = (x, blocks, dense_u, bias, out_features)
    nb, t, p = blocks.shape
    width = max(t, dense_u.shape[0]) if dense_u is not None else t
    tiles = gemm.candidate_tiles(_rows(x), width, max(p, nb * t if dense_u is not None else p), x.dtype,
                                 tma=dense_u is not None and gemm.hopper(x))      # the h·Uᵀ GEMM is a plain one
    out = [Candidate(f"triton[{c.name}]", "triton", lambda c=c: launch(*args, activation, residual, tiles=c))
           for c in tiles]
    out.append(Candidate("aten", "aten", lambda: reference(*args, None, 0, activation, residual)))
    return out


def candidates_lowrank(x, u, v, bias, activation="none", residual=None):
    tiles = gemm.candidate_tiles(_rows(x), max(u.shape[0], v.shape[0]), max(v.shape[1], v.shape[0]), x.dtype,
                                 tma=gemm.hopper(x))
    out = [Candidate(f"triton[{c.name}]", "triton",
                     lambda c=c: launch_lowrank(x, u, v, bias, activation, residual, tiles=c)) for c in tiles]
    out.append(Candidate("aten", "aten", lambda: reference_lowrank(x, u, v, bias, None, 0, activation, residual)))
    return out
