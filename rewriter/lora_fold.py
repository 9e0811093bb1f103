"""Merge arithmetic of LoRA / DoRA adapters: fold them into the base weight, rounded once, and undo that bit for bit.

A layer's active adapters, in the order its op applies them, each map the weight W (out, in) to

    plain   W ← W + g·Δ                          Δ = s·B·A
    DoRA    W ← (1 + g·(f − 1))·W + g·f·Δ         f = m / ‖W₀ + Δ‖_row   (W₀ the unmerged base weight)

which is exactly what the op's forward does to y = x·Wᵀ (rewriter/ops/multi_lora_linear.py). Merging composes these
maps in float64 (products of ≤ 24-bit mantissas are exact; sums round at 2⁻⁵³) and rounds once:

    W' = round(F(W))                    F = the composition, F⁻¹ its inverse (W ← (W − add) / row_scale, reversed)
    W̃  = round(F⁻¹(W'))                 what a plain unmerge gives (PEFT stops here and drifts in bf16: #1388, #2502)
    c  = ord(W) − ord(W̃)                the correction in ulps, stored in the smallest integer type that holds it

and unmerge returns ord⁻¹(ord(round(F⁻¹(W'))) + c) = W. `ord` maps a float's bits to an integer that is monotonic
in its value (negative floats: −magnitude − 1, so −0.0 ≠ +0.0 survives), so c counts ulps and stays small across
zero: int8, one byte per weight, unless the adapters dwarf W.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · B·A in float64, shape (out, in)."""
    return (lora_b.double() @ lora_a.double()) * scale


def dora_norm(weight: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """‖W + Δ‖ per output row in float64 (W (out, in) in any dtype, Δ in float64)."""
    return torch.linalg.norm(weight.double() + d, dim=1)


@dataclass
class Step:
    """One adapter's map W ← row_scale·W + add (row_scale None: 1)."""

    add: torch.Tensor                    # float64 (out, in)
    row_scale: torch.Tensor | None = None  # float64 (out,)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w if self.row_scale is None else w * self.row_scale[:, None]) + self.add

    def inverse(self, w: torch.Tensor) -> torch.Tensor:
        w = w - self.add
        return w if self.row_scale is None else w / self.row_scale[:, None]


def plain_step(d: torch.Tensor, gate: float = 1.0) -> Step:
    return Step(d * gate)


def dora_step(d: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, gate: float = 1.0) -> Step:
    """The DoRA map with f = m / norm (norm: float64 ‖W₀ + Δ‖_row, kept by the merge for the unmerge)."""
    f = magnitude.double() / norm
    return Step(d * (gate * f)[:, None], 1.0 + gate * (f - 1.0))


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits -> int64 ordered like the float values (−0.0 -> −1, +0.0 -> 0)."""
    bits = t.contiguous().view(_BITS[t.dtype]).long()
    width = torch.iinfo(_BITS[t.dtype]).bits
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude - 1, magnitude)


def _from_ordered(ordered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    width = torch.iinfo(_BITS[dtype]).bits
    negative = ordered < 0
    magnitude = torch.where(negative, -ordered - 1, ordered)
    bits = torch.where(negative, magnitude - (1 << (width - 1)), magnitude)  # set the sign bit (two's complement)
    return bits.to(_BITS[dtype]).view(dtype)


def _smallest_int(values: torch.Tensor) -> torch.Tensor:
    lo, hi = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return values.to(dtype)
    raise AssertionError("unreachable")


def _apply(w: torch.Tensor, steps: list[Step], transposed: bool, inverse: bool) -> torch.Tensor:
    """The composed map (or its inverse) on a weight stored (out, in), or (in, out) when `transposed`, in float64."""
    w64 = w.double()
    w64 = w64.t() if transposed else w64
    for step in (reversed(steps) if inverse else steps):
        w64 = step.inverse(w64) if inverse else step.forward(w64)
    return (w64.t() if transposed else w64).to(w.dtype).contiguous()


def fold(w: torch.Tensor, steps: list[Step], transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' = round(F(W)), correction c) for a stored weight W; see the module docstring."""
    merged = _apply(w, steps, transposed, inverse=False)
    plain_unmerge = _apply(merged, steps, transposed, inverse=True)
    return merged, _smallest_int(_ordered(w) - _ordered(plain_unmerge))


def unfold(merged: torch.Tensor, steps: list[Step], correction: torch.Tensor,
           transposed: bool = False) -> torch.Tensor:
    """The original W, bit for bit, from W', the same steps and the stored correction."""
    plain_unmerge = _apply(merged, steps, transposed, inverse=True)
    return _from_ordered(_ordered(plain_unmerge) + correction.long(), merged.dtype)


def fold_rounded(w: torch.Tensor, steps: list[Step], transposed: bool = False) -> torch.Tensor:
    """W' = round(F(W)) alone (merge-and-unload: nothing kept to undo it)."""
    return _apply(w, steps, transposed, inverse=False)


def merge_weight(w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' = round(W + Δ), correction c) for one plain adapter (W and Δ both (out, in))."""
    return fold(w, [plain_step(d)])


def unmerge_weight(merged: torch.Tensor, d: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """The original W, bit for bit, from W' = round(W + Δ), Δ and the stored correction."""
    return unfold(merged, [plain_step(d)], correction)
