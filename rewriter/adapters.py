"""What the LoRA passes share: names of adapter tensors, building a `rewrite::lora_linear` node, merge arithmetic.

Naming, for a layer whose weight is `<layer>.weight`:
    <layer>.lora_A, <layer>.lora_B   adapter factors A (r, in), B (out, r): Parameters while unmerged,
                                     buffers after merge (kept so the merge can be undone)
    <layer>.lora_merged              float64 [scale, dropout] — present exactly when the layer is merged
    <layer>.lora_correction          integer tensor, see `merge_weight`

Merge arithmetic (exact unmerge):
    Δ  = scale · B·A                 in float64 (products of ≤ 24-bit mantissas are exact; sums round at 2⁻⁵³)
    W' = round_dtype(W + Δ)          merged weight, rounded once
    W̃  = round_dtype(W' − Δ)         what a plain unmerge would give (PEFT stops here and drifts)
    c  = ord(W) − ord(W̃)             difference in ulps, stored in the smallest int type that holds it
Unmerge recomputes W̃ and returns ord⁻¹(ord(W̃) + c) = W, bit for bit. `ord` maps a float's bits to an integer
that is monotonic in the float's value (negative floats: −magnitude − 1, so −0.0 ≠ +0.0 survives), so c counts
ulps and stays small across zero.
"""
from __future__ import annotations

import torch
from torch import fx

from . import params
from .ir import insert_call
from .matchers.linear import LinearSite, layer_tensor_name

aten = torch.ops.aten
LORA_OP = torch.ops.rewrite.lora_linear.default
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def layer_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] if "." in weight_name else weight_name


def adapter_names(weight_name: str) -> dict[str, str]:
    """Names of the adapter tensors of the layer whose weight is `weight_name` (beside it; at the root for a
    model that is one linear layer: `weight_lora_A`)."""
    return {k: layer_tensor_name(weight_name, f"lora_{k}") for k in ("A", "B", "merged", "correction")}


def weight_out_in_node(gm: fx.GraphModule, site: LinearSite, *, pass_name: str, rule: str) -> fx.Node:
    """A node giving W as (out, in): the get_attr itself, or aten.t of it for (in, out) storage."""
    if site.layout == "out_in":
        return site.weight
    return insert_call(gm, site.node, aten.t.default, (site.weight,), pass_name=pass_name, rule=rule)


def build_lora_node(gm: fx.GraphModule, site: LinearSite, a_name: str, b_name: str, scale: float,
                    dropout: float, *, pass_name: str, rule: str) -> fx.Node:
    """Insert rewrite::lora_linear(x, W, b, A, B, scale[, dropout(x)]) computing the same layer plus adapter."""
    w = weight_out_in_node(gm, site, pass_name=pass_name, rule=rule)
    a = params.get_attr_node(gm, a_name)
    b = params.get_attr_node(gm, b_name)
    args = [site.x, w, site.bias, a, b, float(scale)]
    if dropout > 0:
        args.append(insert_call(gm, site.node, aten.dropout.default, (site.x, float(dropout), True),
                                pass_name=pass_name, rule=rule))
    return insert_call(gm, site.node, LORA_OP, tuple(args), pass_name=pass_name, rule=rule, replaces=site.node)


def delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · B·A in float64, shape (out, in)."""
    return (lora_b.double() @ lora_a.double()) * scale


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


def merge_weight(w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' = round(W + Δ), correction c) for a weight W (out, in) and Δ in float64. See module docstring."""
    merged = (w.double() + d).to(w.dtype)
    plain_unmerge = (merged.double() - d).to(w.dtype)
    return merged, _smallest_int(_ordered(w) - _ordered(plain_unmerge))


def unmerge_weight(merged: torch.Tensor, d: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """The original W, bit for bit, from W', Δ and the stored correction."""
    plain_unmerge = (merged.double() - d).to(merged.dtype)
    return _from_ordered(_ordered(plain_unmerge) + correction.long(), merged.dtype)


def shared_readers(gm: fx.GraphModule, weight_name: str, node: fx.Node) -> list[fx.Node]:
    """Ops other than `node` (and the t() views feeding it) that read this weight under any name."""
    own = {node} | {u for u in node.all_input_nodes if u.op == "call_function" and u.target == aten.t.default}
    return [r for r in params.readers(gm, weight_name) if r not in own]
