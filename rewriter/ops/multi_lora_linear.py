"""`rewrite::multi_lora_linear` — a linear layer holding several named LoRA / DoRA adapters, switchable at run time,
with an optional per-row adapter index (mixed-adapter batches).

    multi_lora_linear(x, weight?, bias?, base?, lora_a[], lora_b[], magnitudes[], names, scales[], gates[], ids[],
                      dora[], index?, adapter_input?)

The base layer is either dense — `weight` W (out, in) and `bias` — or any other op whose output is passed as `base`
(a Monarch / block-diagonal / low-rank / ShiftAdd layer, bias included; QLoRA-style adapters on a compressed layer).
Adapter k: A_k (r_k, in), B_k (out, r_k), scale s_k, gate g_k, batch id ids[k]; `dora[k]` ≥ 0 names its DoRA
magnitude vector m = magnitudes[dora[k]] (out,), −1 for plain LoRA. `names` lists the adapters' names, comma-joined.
With l_k(x) = (x_a·A_kᵀ)·B_kᵀ (x_a = adapter_input, e.g. dropout(x), or x):

    y ← x·Wᵀ  (or base)
    gated mode (index None or empty): for each adapter k in order with g_k ≠ 0
        plain   y ← y + g_k·s_k·l_k(x)
        DoRA    y ← y + g_k·((f_k − 1)·y + f_k·s_k·l_k(x)),    f_k = m_k / ‖W + s_k·B_k·A_k‖_row  (norm detached)
                (with an adapter_input the base term is x_a·Wᵀ instead of y, as PEFT does under dropout)
    row mode (index given, one entry per row of x — x.shape[0], or 1 for a vector): a row whose index equals
        ids[k] gets adapter k with gate 1, the same formulas restricted to that row; any other index (−1) gets none.
    y ← y + bias

This is PEFT's forward (LoRA `result + lora_B(lora_A(dropout(x)))·scaling`; DoRA `DoraLinearLayer.forward`, whose
several active adapters compose in order in the same way), plus gates (weights of active adapters; PEFT's are 1)
and the row index (PEFT's `adapter_names=` mixed batches). Gates, scales, ids and names are constants of the graph:
`rewriter.lora_runtime` changes them in a program without re-exporting it; the index is a tensor (a buffer of the
program, `lora_index`) that changes per call.

Eager cost: one GEMM for the base, and per adapter two rank-r GEMMs accumulated into y in place (`addmm_`, or
`index_add_` of the selected rows); a structured base is copied once. Autograd recomputes the reference (torch ops)
for the tensors that need a gradient; DoRA's norm gets none (DoRA paper §4.3, as in PEFT).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def row_index(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
    """The index per flattened row of x (rows of a 3-D x share their batch entry's index), or None (gated mode)."""
    if index is None or index.numel() == 0:
        return None
    batch = x.shape[0] if x.dim() > 1 else 1
    if index.dim() != 1 or index.numel() != batch:
        raise ValueError(f"the adapter index has shape {list(index.shape)}; this layer's input has {batch} rows "
                         f"(one index per entry of the first dimension)")
    per_row = _rows(x) // batch if batch else 0
    return index.long().repeat_interleave(per_row) if per_row != 1 else index.long()


def dora_factor(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                scale: float) -> torch.Tensor:
    """f = m / ‖W + s·B·A‖ per output row, in W's dtype (as PEFT's get_weight_norm), without gradient to the norm."""
    with torch.no_grad():
        norm = torch.linalg.norm(weight + scale * (lora_b @ lora_a), dim=1).to(weight.dtype)
    return magnitude / norm


def compute(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index=None,
            adapter_input=None):
    """The op's semantics (module docstring) with torch ops; differentiable (the backward re-runs it)."""
    n_out = weight.shape[0] if weight is not None else base.shape[-1]
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = x2 if adapter_input is None else adapter_input.reshape(-1, x.shape[-1])
    has_dora = any(d >= 0 for d in dora)
    if weight is not None:
        y = F.linear(x2, weight, None if has_dora else bias)
    else:
        y = base.reshape(-1, n_out).clone()
    rows = row_index(x, index)
    for k in range(len(lora_a)):
        a, b, s = lora_a[k], lora_b[k], float(scales[k])
        if rows is None:
            g = float(gates[k])
            if g == 0.0:
                continue
            sel = None
        else:
            sel = (rows == int(ids[k])).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            g = 1.0
        xs = xa2 if sel is None else xa2.index_select(0, sel)
        h = F.linear(xs, a)
        if dora[k] < 0:
            if sel is None:
                y.addmm_(h, b.t(), alpha=g * s)
            else:
                y.index_add_(0, sel, F.linear(h, b), alpha=g * s)
            continue
        f = dora_factor(weight, a, b, magnitudes[dora[k]], s)
        base_term = (y if sel is None else y.index_select(0, sel)) if adapter_input is None \
            else F.linear(xs, weight)
        update = (f - 1) * base_term + f * (s * F.linear(h, b))
        if sel is None:
            y = y + g * update
        else:
            y = y.index_add(0, sel, update)
    if bias is not None and (has_dora or weight is None):
        y = y + bias
    return y.reshape(*x.shape[:-1], n_out)


@torch.library.custom_op("rewrite::multi_lora_linear", mutates_args=())
def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      base: torch.Tensor | None, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                      magnitudes: list[torch.Tensor], names: str, scales: list[float], gates: list[float],
                      ids: list[int], dora: list[int], index: torch.Tensor | None = None,
                      adapter_input: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return compute(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index,
                       adapter_input)


def reference(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index=None,
              adapter_input=None):
    """Plain torch ops, as `--decompose` inlines them (the gates, scales and ids are constants there)."""
    return compute(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index,
                   adapter_input)


@multi_lora_linear.register_fake
def _(x, weight, bias, base, lora_a, lora_b, magnitudes, names, scales, gates, ids, dora, index=None,
      adapter_input=None):
    n_out = weight.shape[0] if weight is not None else base.shape[-1]
    return x.new_empty(*x.shape[:-1], n_out)


_TENSOR_ARGS = ("x", "weight", "bias", "base", "lora_a", "lora_b", "magnitudes", "index", "adapter_input")
_POSITIONS = {"x": 0, "weight": 1, "bias": 2, "base": 3, "lora_a": 4, "lora_b": 5, "magnitudes": 6, "index": 12,
              "adapter_input": 13}


def _setup_context(ctx, inputs, output):
    flat, layout = [], []
    for name in _TENSOR_ARGS:   # trailing arguments left at their default (None) are not in `inputs`
        value = inputs[_POSITIONS[name]] if _POSITIONS[name] < len(inputs) else None
        if isinstance(value, (list, tuple)):
            layout.append((name, len(value)))
            flat.extend(value)
        else:
            layout.append((name, None if value is None else -1))
            if value is not None:
                flat.append(value)
    ctx.save_for_backward(*flat)
    ctx.layout = layout
    ctx.constants = inputs[7:12]


def _backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    needs = ctx.needs_input_grad
    values, wanted, pos = {}, [], 0
    with torch.enable_grad():
        for name, count in ctx.layout:
            need = needs[_POSITIONS[name]] if _POSITIONS[name] < len(needs) else False
            if count is None:
                values[name] = None
            elif count == -1:
                t = saved[pos].detach()
                pos += 1
                if need and t.is_floating_point():
                    t.requires_grad_(True)
                    wanted.append((name, None, t))
                values[name] = t
            else:
                items = []
                for i in range(count):
                    t = saved[pos].detach()
                    pos += 1
                    if need[i] and t.is_floating_point():
                        t.requires_grad_(True)
                        wanted.append((name, i, t))
                    items.append(t)
                values[name] = items
        y = compute(values["x"], values["weight"], values["bias"], values["base"], values["lora_a"],
                    values["lora_b"], values["magnitudes"], *ctx.constants, values["index"], values["adapter_input"])
        grads = torch.autograd.grad(y, [t for _, _, t in wanted], grad, allow_unused=True) if wanted else []
    out: list = [None] * len(needs)     # one entry per argument given (trailing defaults may be left out)
    for name, count in ctx.layout:
        if count is not None and count >= 0 and _POSITIONS[name] < len(out):
            out[_POSITIONS[name]] = [None] * count
    for (name, i, _), g in zip(wanted, grads):
        if i is None:
            out[_POSITIONS[name]] = g
        else:
            out[_POSITIONS[name]][i] = g
    return tuple(out)


multi_lora_linear.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.multi_lora_linear.default


def flops(node):
    """2·N·in·out for a dense base (a structured base counts as its own op), plus per adapter 2·N_k·r·(in + out)
    where N_k is every row for an active adapter in gated mode (inactive: 0) and, in row mode, unknown until run
    time — counted as every row, the worst case."""
    x = node.args[0].meta["val"]
    weight = node.args[1]
    rows = x.numel() // x.shape[-1]
    in_f = x.shape[-1]
    total = 0
    if weight is not None:
        out_f = weight.meta["val"].shape[0]
        total += 2 * rows * in_f * out_f
    gates, index = node.args[9], node.args[12] if len(node.args) > 12 else None
    for a, g in zip(node.args[4], gates):
        if g == 0.0 and index is None:
            continue
        total += 2 * rows * a.meta["val"].shape[0] * (in_f + node.meta["val"].shape[-1])
    return total
