"""The pointwise epilogue the linear templates fuse after their GEMM: y = act(x·Wᵀ + b) + residual.

ACTIVATIONS maps an activation name to the kernels' ACT constexpr (0 none, 1 GELU with erf, 2 GELU with tanh;
codegen/tl_math.py has the Triton side); `epilogue` is the same computation with torch ops, used by every
template's reference, the ops' fallbacks and their pre-merged dense paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2}


def epilogue(y: torch.Tensor, activation: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(y) + residual."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} (one of {', '.join(ACTIVATIONS)})")
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y
