"""Fused LoRA linear: y = act(x·Wᵀ + b + s·(x_a·Aᵀ)·Bᵀ) + residual.

The base GEMM's main loop is a plain GEMM's (codegen/templates/gemm.py) — the adapter must cost about its own
FLOPs and bytes, not a slower main loop — and the rank-r path rides along it:

    h = s·(x_a·Aᵀ)             one skinny GEMM (N = r ≤ 128), written once: rows·r values (r/N of the output)
    y = x·Wᵀ + h·Bᵀ + b → act → + residual      one GEMM whose K loop over x·Wᵀ is followed by ⌈r/BR⌉ ≤ 8
                                                 steps over h·Bᵀ, then the epilogue on the fp32 tile

so the adapter adds 2·rows·r·(K + N) FLOPs (~1 % at r = 16, d = 4096) and one extra read of x for h.

Candidates for codegen.select (`candidates`): the fused kernel in the GEMM template's tile configurations (on a
Hopper GPU also with TMA loads and a warp-specialised main loop); the
"cublas+epilogue" variant (cuBLAS computes x·Wᵀ, then one Triton pass adds h·Bᵀ + b, the activation and the
residual: the issue's suggested fallback when cuBLAS's main loop beats Triton's); and two aten paths — the op's
own formula (`reference`: three F.linear, a scale and an add, then the epilogue) and `aten_addmm` (F.linear,
then one addmm_ adding s·h·Bᵀ in place).

Precision: as in the GEMM template; the one rounded intermediate is h = s·(x_a·Aᵀ), stored in the input dtype
(fp32 where the dots are upcast: fp32 inputs, bf16 under the interpreter) — the torch reference in fp16 rounds
h and h·Bᵀ too. Bias, activation and residual are applied to the fp32 accumulator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from codegen.epilogue import ACTIVATIONS, epilogue
from codegen.select import Candidate
from codegen.templates import gemm
from codegen.templates.gemm import Tiles


def supported(x, weight, bias, lora_a, lora_b, adapter_input, residual) -> str | None:
    """None when the kernel handles these inputs, else the reason it does not."""
    dt = x.dtype
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dt} has no kernel"
    for t in (weight, bias, lora_a, lora_b, adapter_input, residual):
        if t is not None and t.dtype != dt:
            return "mixed dtypes"
    if lora_a.shape[0] > 128:
        return "rank > 128"
    return None


def _prepare(x, weight, lora_a, adapter_input, residual, out):
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    xa2 = adapter_input.reshape(-1, K) if adapter_input is not None else x2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    res2 = residual.broadcast_to(*x.shape[:-1], N).reshape(M, N) if residual is not None else None
    return x2, xa2, y, res2, M, N


def adapter_tiles(M: int, R: int, K: int, dtype) -> Tiles:
    """Tiles of the h GEMM: one column tile (BN ≥ r) and row tiles small enough that the grid has ≥ ~132
    programs (one per SM of an H100): the GEMM is a streaming read of x (rows × K), so it needs every SM's load
    bandwidth, not big tiles."""
    if gemm.interpreter():
        return gemm.default_tiles(M, R, K, dtype)
    bm = max(16, min(128, gemm.pow2(M // 132, 1)))
    return Tiles(bm, 16, 64, 4, 4).clamp(M, R, K) if R <= 16 else Tiles(bm, 64, 64, 4, 4).clamp(M, R, K)


def adapter_activation(xa2, lora_a, scale, tiles: Tiles | None = None) -> torch.Tensor:
    """h = s·(x_a·Aᵀ): (rows, r), in gemm.intermediate_dtype."""
    M, R = xa2.shape[0], lora_a.shape[0]
    h = torch.empty(M, R, dtype=gemm.intermediate_dtype(xa2.dtype), device=xa2.device)
    gemm.launch(xa2, lora_a.unsqueeze(0), h, M_out=R, alpha=float(scale),
                tiles=tiles or adapter_tiles(M, R, xa2.shape[1], xa2.dtype))
    return h


def launch(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none", residual=None,
           blocks: Tiles | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel (h, then the GEMM with the adapter loop and the epilogue); `blocks` the main GEMM's tiles
    (default: the heuristic first candidate). `out` (rows, N), any strides, receives the result."""
    x2, xa2, y, res2, M, N = _prepare(x, weight, lora_a, adapter_input, residual, out)
    if M and N:
        h = adapter_activation(xa2, lora_a, scale)
        gemm.launch(x2, weight.unsqueeze(0), y, M_out=N, extra=(h, lora_b), bias=bias,
                    activation=ACTIVATIONS[activation], residual=res2, tiles=blocks)
    return y.reshape(*x.shape[:-1], N) if out is None else out


def launch_cublas_epilogue(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none",
                           residual=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ by cuBLAS (F.linear, in the input dtype), then one Triton pass: act(that + h·Bᵀ + b) + residual."""
    x2, xa2, y, res2, M, N = _prepare(x, weight, lora_a, adapter_input, residual, out)
    if M and N:
        base = gemm.dense_linear(x2, weight)
        h = adapter_activation(xa2, lora_a, scale)
        gemm.launch(h, lora_b.unsqueeze(0), y, M_out=N, c=base, bias=bias, activation=ACTIVATIONS[activation],
                    residual=res2)
    return y.reshape(*x.shape[:-1], N) if out is None else out


def reference(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none", residual=None):
    """The same computation with torch ops (the base op's formula, then the epilogue)."""
    xa = x if adapter_input is None else adapter_input
    y = F.linear(x, weight, bias) + scale * F.linear(F.linear(xa, lora_a), lora_b)
    return epilogue(y, activation, residual)


def aten_addmm(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none", residual=None):
    """torch ops with fewer passes over the output: y = x·Wᵀ + b (one addmm), y += s·h·Bᵀ in place (one addmm_),
    then the epilogue."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    xa2 = x2 if adapter_input is None else adapter_input.reshape(-1, K)
    y = F.linear(x2, weight, bias)
    y.addmm_(F.linear(xa2, lora_a), lora_b.t(), alpha=scale)
    return epilogue(y.view(*x.shape[:-1], N), activation, residual)


def candidates(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none", residual=None):
    """codegen.select candidates for one call: Triton first (the heuristic default leading), then aten."""
    args = (x, weight, bias, lora_a, lora_b, scale, adapter_input, activation, residual)
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    tiles = gemm.candidate_tiles(M, weight.shape[0], x.shape[-1], x.dtype, tma=gemm.hopper(x))
    out = [Candidate(f"triton[{t.name}]", "triton", lambda t=t: launch(*args, blocks=t)) for t in tiles]
    out.append(Candidate("cublas+triton-epilogue", "triton", lambda: launch_cublas_epilogue(*args)))
    out.append(Candidate("aten", "aten", lambda: reference(*args)))
    out.append(Candidate("aten-addmm", "aten", lambda: aten_addmm(*args)))
    return out
