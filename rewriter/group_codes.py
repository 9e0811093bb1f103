"""Per-group scales and offsets stored as small integer codes — the affine code's double quantisation.

The affine code (rewriter/bcq.py) has one scale s and one offset β per (row, group of g input columns). Stored in
fp16 they cost 32/g bits per weight: 1 at g = 32, 0.5 at g = 64. Stored as `bits`-bit integers under one step per
S consecutive groups of a row (the layout of llama.cpp's k-quants, whose Q4_K is 4.5 bits per weight):

    s[r, j] = step_s[r, j // S] · c_s[r, j]                 c_s ∈ [0, 2^b − 1]      (scales are ≥ 0)
    β[r, j] = step_β[r, j // S] · (c_β[r, j] − 2^{b−1})     c_β ∈ [1, 2^b − 1]      (offsets are signed)

S = ⌈G / max(1, ⌊G/8⌋)⌉ for G groups per row: about 8, so that a row has at most G/8 steps (S = 9 for SmolLM2's
576-wide layers at g = 32, whose 18 groups would need 3 steps of 8).

with step = (largest |value| of the super-block) / (largest code), rounded down to the steps' dtype (fp16, or bf16
for a bf16 model). They cost at most 2b/g + 2·16/(8g) bits per weight: at b = 6 and g = 32 that is 0.5, what fp16 costs
at g = 64, for twice as many groups. Why: a group of 32 follows the weights' local range twice as closely, and a 6-bit code
loses little on a scale (relative error ≤ 1/126 at the super-block's largest) — measured on SmolLM2, whose weights
came as Q4_1 (group 32), and on MiniLM's fp32 weights (README, "Where shiftadd's bits stand").

Storage: the codes of a row are one little-endian bit stream, padded to whole bytes: uint8 (out, ⌈G·b/8⌉); steps
(out, ⌈G/S⌉). In a program the op `rewrite::group_values(codes, steps, groups, bits, signed)` decodes them into the
float32 (out, G) tensor the shift-add op reads (rewriter/ops/group_values.py).

Encoding a decoded tensor again gives the same codes and steps: the step is rounded down, so the largest value of a
super-block always takes the largest code, its decoded value is step × largest code, and the step is recomputed
exactly from it. Fits therefore work on decoded values (`round_trip`) and the stored form follows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER = 8          # groups per step, about


def groups_per_step(groups: int) -> int:
    """S: the groups that share one step, for `groups` groups per row (at most ⌊groups/8⌋ steps, at least one)."""
    return -(-groups // max(1, groups // SUPER))


@dataclass
class GroupCodes:
    codes: torch.Tensor     # uint8 (out, ⌈groups·bits/8⌉): the codes' bit stream per row
    steps: torch.Tensor     # fp16/bf16 (out, ⌈groups/S⌉)
    groups: int
    bits: int
    signed: bool

    def decode(self) -> torch.Tensor:
        return decode(self.codes, self.steps, self.groups, self.bits, self.signed)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.steps.numel() * self.steps.element_size()


def largest_code(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def _per_group_steps(steps: torch.Tensor, groups: int) -> torch.Tensor:
    return steps.float().repeat_interleave(groups_per_step(groups), dim=1)[:, :groups]


def encode(values: torch.Tensor, bits: int, signed: bool, dtype: torch.dtype = torch.float16) -> GroupCodes:
    """values (out, G) float -> GroupCodes. Unsigned codes clamp negative values to 0."""
    c, steps = _nearest(values, bits, signed, dtype)
    c = (c + 2 ** (bits - 1) if signed else c).to(torch.int64)
    return GroupCodes(_pack(c, bits), steps, values.shape[1], bits, signed)


def decode(codes: torch.Tensor, steps: torch.Tensor, groups: int, bits: int, signed: bool) -> torch.Tensor:
    """float32 (out, groups) from the packed codes and steps."""
    c = _unpack(codes, groups, bits).float()
    if signed:
        c = c - 2 ** (bits - 1)
    return c * _per_group_steps(steps, groups)


def round_trip(values: torch.Tensor, bits: int, signed: bool, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The values the codes can hold nearest to `values` (float32): decode(encode(values)), bit for bit, without
    packing the codes (heal's straight-through forward calls it on every layer at every step)."""
    c, steps = _nearest(values, bits, signed, dtype)
    return c * _per_group_steps(steps, values.shape[1])


def _nearest(values: torch.Tensor, bits: int, signed: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 codes c (out, G), centred when signed; steps (out, ⌈G/S⌉) in `dtype`): c·step is the value the
    codes hold nearest to each of `values`."""
    out_f, groups = values.shape
    v = values.float() if signed else values.float().clamp_min(0)
    per_step = groups_per_step(groups)
    supers = -(-groups // per_step)
    padded = torch.nn.functional.pad(v, (0, supers * per_step - groups)).view(out_f, supers, per_step)
    top = largest_code(bits, signed)
    steps = _round_down((padded.abs().amax(-1) / top), dtype)
    step = _per_group_steps(steps, groups)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    c = torch.where(step > 0, (v / safe).round(), torch.zeros_like(v)).clamp(-top if signed else 0, top)
    return c, steps


def bits_per_weight(bits: int, group: int, dtype_bits: int = 16) -> float:
    """Bits per weight of a scale and an offset coded with `bits` per group of `group` weights, one step per 8
    groups (a row's bound; no padding)."""
    return 2 * (bits + dtype_bits / SUPER) / group


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x ≥ 0 (float32) rounded toward zero to `dtype` (16-bit float): one unit less where nearest rounded up."""
    if dtype == torch.float32:
        return x
    s = x.to(dtype)
    over = s.float() > x
    return torch.where(over, (s.view(torch.int16) - 1).view(dtype), s)


def _pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes (out, G) < 2^bits -> uint8 (out, ⌈G·bits/8⌉): bit k of code j is stream bit j·bits + k."""
    out_f, groups = c.shape
    stream = ((c[..., None] >> torch.arange(bits, device=c.device)) & 1).reshape(out_f, groups * bits)
    nbytes = -(-groups * bits // 8)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - groups * bits)).view(out_f, nbytes, 8)
    return (stream << torch.arange(8, device=c.device)).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    out_f = packed.shape[0]
    stream = ((packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1).reshape(out_f, -1)
    stream = stream[:, : groups * bits].view(out_f, groups, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)
