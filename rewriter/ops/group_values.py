"""`rewrite::group_values` — per-group scales or offsets decoded from integer codes (rewriter/group_codes.py).

    v[r, j] = steps[r, j // 8] · (c[r, j] − (2^{bits−1} if signed else 0)),   c = the j-th `bits`-bit code of row r

codes: uint8 (out, ⌈groups·bits/8⌉), the codes of a row as one little-endian bit stream; steps: float (out,
⌈groups/8⌉). Returns float32 (out, groups): the `scales` / `offsets` argument of `rewrite::shiftadd_linear` when the
affine code stores them as codes (`shiftadd{scale_bits=6}`, the default). The work is per (row, group), i.e. 1/group
of the layer's weights; no gradient (the codes are discrete, `heal` trains their decoded values and re-encodes).
"""
from __future__ import annotations

import torch

from .. import group_codes


@torch.library.custom_op("rewrite::group_values", mutates_args=())
def group_values(codes: torch.Tensor, steps: torch.Tensor, groups: int, bits: int, signed: bool) -> torch.Tensor:
    return reference(codes, steps, groups, bits, signed)


def reference(codes, steps, groups, bits, signed):
    return group_codes.decode(codes, steps, groups, bits, signed)


@group_values.register_fake
def _(codes, steps, groups, bits, signed):
    return steps.new_empty(codes.shape[0], groups, dtype=torch.float32)


OP = torch.ops.rewrite.group_values.default


def flops(node):
    """One multiply (and for offsets one subtraction) per decoded value."""
    codes = node.args[0].meta["val"]
    return codes.shape[0] * node.args[2] * (2 if node.args[4] else 1)
