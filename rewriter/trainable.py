"""The rewritten layers of a program as `heal` sees them: what each one is, its dense weight, its closed-form
re-projection, and the temporary training forms of the parts that are not plain trainable tensors.

    kind        tensors                        dense weight Ŵ                     trained in e2e
    monarch     w1, w2 (+ pre-merged dense)    the op on the identity             w1, w2
    blockdiag   blocks, u | None (+ dense)     the op on the identity             blocks, u
    lowrank     u, v (+ dense)                 u·v                                u, v
    shiftadd    signs (packed), exponents      Σᵢ 2^e·Bᵢ                          the scales α (straight-through)
                (+ scales s, offsets β)        s·Σᵢ 2^e·Bᵢ + β (affine code)      s and β (plain fp32 copies)
                (or their codes and steps)                                        (their codes: straight-through)
    vq          codebook, code map             —                                  the codebook
    linear      weight (dense, untouched)      W                                  a LoRA branch U·V, merged after

Shift-add scales train through a straight-through estimator: the forward uses the snapped scales
snap(α) (sums of `terms` powers of two — exactly what the packed form will hold), the gradient reaches the
continuous α as if snapping were the identity; after training the exponents are re-derived from α, so the saved
program keeps its packed form. The affine code's scales and offsets are continuous: they train as fp32 copies and
are rounded back to their stored dtype (fp16) after training; coded ones (`rewrite::group_values`,
rewriter/group_codes.py) train the same way, their forward rounded to what the codes hold (straight-through), and
are coded again after training. A LoRA branch y += x·Vᵀ·Uᵀ (U = 0 at the start, so the program is unchanged) is a
`rewrite::lowrank_linear` beside the layer: merged into a dense W after training (W += U·V in float64, rounded
once), kept beside layers that cannot absorb it (binary weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from . import bcq, group_codes, params
from .ir import get_attr_value, insert_call
from .matchers.linear import LinearSite, layer_tensor_name
from .ops import (blockdiag_linear, group_values, lowrank_linear, monarch_linear, shiftadd_linear, softplus_attention,
                  vq_logits)
from .projections import Factored

aten = torch.ops.aten
KINDS = {monarch_linear.OP: "monarch", blockdiag_linear.OP: "blockdiag", lowrank_linear.OP: "lowrank",
         shiftadd_linear.OP: "shiftadd", torch.ops.rewrite.vq_logits.default: "vq"}
# argument positions of the tensors of each op: role -> index
ROLES = {"monarch": {"w1": 1, "w2": 2, "dense": 5}, "blockdiag": {"blocks": 1, "u": 2, "dense": 5},
         "lowrank": {"u": 1, "v": 2, "dense": 4}, "shiftadd": {"signs": 1, "exponents": 2, "scales": 6, "offsets": 7},
         "vq": {"codebook": 1, "code_map": 2}}
REQUIRED = {"monarch": ("w1", "w2"), "blockdiag": ("blocks",), "lowrank": ("u", "v"),
            "shiftadd": ("signs", "exponents"), "vq": ("codebook", "code_map")}


CODED = ("scales", "offsets")      # shiftadd roles that may be decoded from codes by rewrite::group_values


@dataclass
class Layer:
    node: fx.Node
    kind: str
    tensors: dict[str, str] = field(default_factory=dict)   # role -> qualified name
    # coded shift-add scales / offsets: role -> (groups, bits, signed); their tensors are role_codes, role_steps
    coded: dict[str, tuple[int, int, bool]] = field(default_factory=dict)

    def value(self, gm, role: str) -> torch.Tensor | None:
        """The role's tensor; for a coded role, its decoded float32 values."""
        if role in self.coded:
            return group_codes.decode(get_attr_value(gm, self.tensors[f"{role}_codes"]),
                                      get_attr_value(gm, self.tensors[f"{role}_steps"]), *self.coded[role])
        name = self.tensors.get(role)
        return get_attr_value(gm, name) if name else None

    @property
    def affine(self) -> bool:
        """A shift-add layer in the affine code (scales and offsets, stored or coded)."""
        return "scales" in self.tensors or "scales" in self.coded

    @property
    def some_tensor(self) -> str:
        return self.tensors[REQUIRED[self.kind][0]]


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Every node of a rewritten op whose tensors are stored in the program."""
    out = []
    for node in gm.graph.nodes:
        kind = KINDS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        tensors, coded = {}, {}
        for role, i in ROLES[kind].items():
            arg = node.args[i] if i < len(node.args) else None
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                tensors[role] = arg.target
            elif role in CODED and _is_group_values(arg):
                tensors[f"{role}_codes"], tensors[f"{role}_steps"] = arg.args[0].target, arg.args[1].target
                coded[role] = tuple(arg.args[2:5])
        if all(r in tensors for r in REQUIRED[kind]):
            out.append(Layer(node, kind, tensors, coded))
    return out


def attention_head_tensors(gm: fx.GraphModule) -> set[str]:
    """Names of the per-head gains and biases softplus attention reads (rewrite::softplus_attention's args 9, 10)."""
    names = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == softplus_attention.OP:
            names.update(a.target for a in node.args[9:11] if isinstance(a, fx.Node) and a.op == "get_attr")
    return names


def _is_group_values(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is group_values.OP \
        and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in arg.args[:2])


def teacher_site(sites: list[LinearSite], tensor_name: str) -> LinearSite | None:
    """The teacher's linear layer a rewritten layer's tensor belongs to (its tensors are named beside the weight)."""
    best = None
    for s in sites:
        prefix = s.tensor_name("")
        if tensor_name.startswith(prefix) and "." not in tensor_name[len(prefix):]:
            if best is None or len(prefix) > len(best.tensor_name("")):
                best = s
    return best


# ---- dense weights and configurations -------------------------------------------------------------------------------
def factored(gm, layer: Layer) -> Factored | None:
    """The layer's factors as a Factored (monarch / blockdiag / blockdense / lowrank), else None."""
    n = layer.node
    x = n.args[0]
    in_f = int(x.meta["val"].shape[-1]) if isinstance(x, fx.Node) and "val" in x.meta else None
    if layer.kind == "monarch":
        w1, w2 = layer.value(gm, "w1"), layer.value(gm, "w2")
        in_f = in_f or w1.shape[0] * w1.shape[2]
        return Factored("monarch", int(n.args[4]), in_f, {"w1": w1, "w2": w2}, {"blocks": w1.shape[0]})
    if layer.kind == "blockdiag":
        blocks, u = layer.value(gm, "blocks"), layer.value(gm, "u")
        in_f = in_f or blocks.shape[0] * blocks.shape[2]
        f = {"blocks": blocks} if u is None else {"blocks": blocks, "u": u}
        return Factored("blockdiag" if u is None else "blockdense", int(n.args[4]), in_f, f,
                        {"blocks": blocks.shape[0]})
    if layer.kind == "lowrank":
        u, v = layer.value(gm, "u"), layer.value(gm, "v")
        return Factored("lowrank", u.shape[0], v.shape[1], {"u": u, "v": v}, {"rank": u.shape[1]})
    return None


@torch.no_grad()
def dense_weight(gm, layer: Layer) -> torch.Tensor | None:
    """Ŵ (out, in) in float64, or None for vq."""
    fac = factored(gm, layer)
    if fac is not None:
        return fac.dense(torch.float64)
    if layer.kind == "shiftadd":
        n = layer.node
        return bcq.dequantize(layer.value(gm, "signs"), layer.value(gm, "exponents"), int(n.args[4]),
                              int(n.args[5]), layer.value(gm, "scales"), layer.value(gm, "offsets")).double()
    return None


def config(gm, layer: Layer) -> tuple:
    """What the layer's re-projection needs besides the target: (kind, ...) of plain values."""
    if layer.kind == "shiftadd":
        exps = layer.value(gm, "exponents")
        stored = layer.value(gm, "scales_steps" if layer.coded else "scales")
        code = "pow2" if stored is None else str(stored.dtype).replace("torch.", "")  # affine: its scales' dtype
        scale_bits = layer.coded["scales"][1] if layer.coded else 0
        return ("shiftadd", exps.shape[2], int(layer.node.args[5]), exps.shape[3], code, scale_bits)
    fac = factored(gm, layer)
    if fac.kind == "monarch":
        return ("monarch", fac.factors["w1"].shape[0])
    if fac.kind == "blockdense":
        b, t, _ = fac.factors["blocks"].shape
        return ("blockdense", b, b * t)
    if fac.kind == "blockdiag":
        return ("blockdiag", fac.factors["blocks"].shape[0])
    return ("lowrank", fac.factors["u"].shape[1])


def reproject(target: torch.Tensor, h: torch.Tensor, cfg: tuple, dtype_name: str) -> dict[str, torch.Tensor]:
    """The calibrated projection of `target` (out, in) under `h` with the layer's configuration: role -> tensor
    (same shapes as the layer's). Runs in ctx.map_layers."""
    from .projections import blockdense_project, blockdiag_project, lowrank_project, monarch_project
    dtype = getattr(torch, dtype_name)
    kind = cfg[0]
    w = target.to(dtype) if dtype != torch.float64 else target
    if kind == "shiftadd":
        _, bits, group, terms, code, scale_bits = cfg
        if code != "pow2":
            q = bcq.quantize_affine(target.float(), bits, group, hessian=h, dtype=getattr(torch, code),
                                    scale_bits=scale_bits)
            if scale_bits:
                return {"signs": q.signs, "exponents": q.exponents, "scales_codes": q.scale_codes.codes,
                        "scales_steps": q.scale_codes.steps, "offsets_codes": q.offset_codes.codes,
                        "offsets_steps": q.offset_codes.steps}
            return {"signs": q.signs, "exponents": q.exponents, "scales": q.scales, "offsets": q.offsets}
        q = bcq.quantize(target.float(), bits, group, 2, terms, hessian=h)
        return {"signs": q.signs, "exponents": q.exponents}
    if kind == "monarch":
        f = monarch_project(w, cfg[1], gram=h).factors
        return {"w1": f["w1"], "w2": f["w2"]}
    if kind == "blockdense":
        f = blockdense_project(w, cfg[1], cfg[2], gram=h).factors
        return {"blocks": f["blocks"], "u": f["u"]}
    if kind == "blockdiag":
        return {"blocks": blockdiag_project(w, cfg[1], gram=h).factors["blocks"]}
    f = lowrank_project(w, rank=cfg[1], gram=h).factors
    return {"u": f["u"], "v": f["v"]}


def dense_of(tensors: dict[str, torch.Tensor], layer_dense_like: Factored | None, cfg: tuple, in_f: int,
             out_f: int) -> torch.Tensor:
    """Ŵ (float64) of a re-projected layer (tensors as `reproject` returns them)."""
    if cfg[0] == "shiftadd":
        scales, offsets = tensors.get("scales"), tensors.get("offsets")
        if cfg[5]:                                                         # coded: decode them
            groups = bcq.padded_in(in_f, cfg[2]) // cfg[2]
            scales, offsets = (group_codes.decode(tensors[f"{role}_codes"], tensors[f"{role}_steps"], groups, cfg[5],
                                                  role == "offsets") for role in CODED)
        return bcq.dequantize(tensors["signs"], tensors["exponents"], in_f, cfg[2], scales, offsets).double()
    kind = {"monarch": "monarch", "blockdense": "blockdense", "blockdiag": "blockdiag", "lowrank": "lowrank"}[cfg[0]]
    return Factored(kind, out_f, in_f, tensors).dense(torch.float64)


def store(gm, layer: Layer, tensors: dict[str, torch.Tensor]) -> None:
    """Write new values for the layer's tensors (same shapes; parameters stay parameters)."""
    for role, value in tensors.items():
        params.set_tensor(gm, layer.tensors[role], value)
    refresh_dense(gm, layer)


@torch.no_grad()
def refresh_dense(gm, layer: Layer) -> None:
    """Recompute a pre-merged dense product after the factors changed."""
    if "dense" in layer.tensors:
        fac = factored(gm, layer)
        old = layer.value(gm, "dense")
        params.set_tensor(gm, layer.tensors["dense"], fac.dense(torch.float64).to(old.dtype))


# ---- shift-add scales: the straight-through training form ---------------------------------------------------------
class _ScaledSigns(torch.autograd.Function):
    """y = x·Wᵀ + b with W = Σᵢ snap(αᵢ)·Bᵢ; the gradient reaches α straight through the snapping."""

    @staticmethod
    def forward(ctx, x, alpha, signs, bias, in_features, group, terms):
        _, snapped = bcq.snap_pow2(alpha.detach(), terms)
        w = _weight(signs, snapped, in_features, group).to(x.dtype)
        ctx.save_for_backward(x, signs, snapped)
        ctx.shape = (in_features, group)
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, signs, snapped = ctx.saved_tensors
        in_features, group = ctx.shape
        w = _weight(signs, snapped, in_features, group).to(grad.dtype)
        grad_x = grad @ w
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        x2 = x.reshape(-1, x.shape[-1]).float()
        gw = F.pad(g2.t() @ x2, (0, bcq.padded_in(in_features, group) - in_features))     # (out, in_pad)
        planes = bcq.unpack_signs(signs)                                                 # (q, out, in_pad)
        q, out_f, n_pad = planes.shape
        grad_alpha = (planes.view(q, out_f, n_pad // group, group) * gw.view(1, out_f, -1, group)).sum(-1)
        grad_bias = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_alpha.permute(1, 2, 0), None, grad_bias, None, None, None


def _weight(signs, alpha, in_features, group):
    planes = bcq.unpack_signs(signs)                                                     # (q, out, in_pad)
    q, out_f, n_pad = planes.shape
    w = (planes.view(q, out_f, -1, group) * alpha.permute(2, 0, 1)[..., None]).sum(0)
    return w.reshape(out_f, n_pad)[:, :in_features]


def scaled_signs_linear(x, alpha, signs, bias, in_features, group, terms):
    return _ScaledSigns.apply(x, alpha, signs, bias, in_features, group, terms)


def affine_signs_linear(x, signs, exponents, bias, in_features, group, scales, offsets, scale_bits=0,
                        steps_dtype=torch.float16, levels=None):
    """The affine code with float scales and offsets that autograd reaches (the training form); coded ones
    (scale_bits > 0) enter the forward as what their codes hold, the gradient passing straight through.
    `levels` (affine_levels, computed once when the form opens) replaces unpacking the signs at every call:
    W = levels·s + β, the same float32 arithmetic as bcq.dequantize, so the same values."""
    if scale_bits:
        scales = scales + (group_codes.round_trip(scales.detach(), scale_bits, False, steps_dtype) - scales).detach()
        offsets = offsets + (group_codes.round_trip(offsets.detach(), scale_bits, True, steps_dtype)
                             - offsets).detach()
    if levels is None:
        w = bcq.dequantize(signs, exponents, in_features, group, scales, offsets)
    else:
        out_f = levels.shape[0]
        w = levels.float().view(out_f, -1, group) * scales.float()[..., None] + offsets.float()[..., None]
        w = w.reshape(out_f, -1)[:, :in_features]
    return F.linear(x, w.to(x.dtype), bias)


def affine_levels(signs: torch.Tensor, exponents: torch.Tensor, group: int) -> torch.Tensor:
    """Σᵢ 2^eᵢ·Bᵢ (out, in_pad) of the affine code: what heal does not train, so its training form computes it once
    (unpacking the bit planes at every call cost ~40 % of a layer's training step on the CPU). float16 when that
    holds them exactly (sums of q ≤ 11 powers of two a few octaves apart: the usual exponents), else float32."""
    levels = bcq.dequantize(signs, exponents, signs.shape[-1] * 8, group)
    half = levels.half()
    return half if torch.equal(half.float(), levels) else levels


def open_shiftadd(gm, layer: Layer) -> list[str]:
    """Swap the layer's op for its training form (returns the names of the tensors to train): the straight-through
    form with a trainable α (pow2 code), or fp32 trainable copies of the scales and offsets (affine code)."""
    n = layer.node
    x, signs, exps_node, bias, in_f, group = n.args[:6]
    decoders = [a for a in n.args[6:8] if _is_group_values(a)]
    if layer.affine:
        names = [params.add_tensor(gm, f"{_affine_name(layer, role)}_train", layer.value(gm, role).float(),
                                   trainable=True) for role in CODED]
        coding = (0, torch.float16)
        if layer.coded:
            coding = (layer.coded["scales"][1], layer.value(gm, "scales_steps").dtype)
        levels = affine_levels(layer.value(gm, "signs"), layer.value(gm, "exponents"), group)
        layer.tensors["levels"] = params.add_tensor(gm, f"{_affine_name(layer, 'scales')}_levels", levels,
                                                    persistent=False)
        with gm.graph.inserting_before(n):
            s_node, b_node, l_node = (params.get_attr_node(gm, name)
                                      for name in (*names, layer.tensors["levels"]))
            new = gm.graph.call_function(affine_signs_linear,
                                         (x, signs, exps_node, bias, in_f, group, s_node, b_node, *coding, l_node))
        layer.tensors["scales_train"], layer.tensors["offsets_train"] = names
    else:
        exps = layer.value(gm, "exponents")
        alpha = bcq.exp_values(exps)                                                      # (out, G, q)
        names = [params.add_tensor(gm, f"{layer.tensors['exponents']}_alpha", alpha, trainable=True)]
        with gm.graph.inserting_before(n):
            a_node = params.get_attr_node(gm, names[0])
            new = gm.graph.call_function(scaled_signs_linear, (x, a_node, signs, bias, in_f, group, exps.shape[3]))
        layer.tensors["alpha"] = names[0]
    n.replace_all_uses_with(new)
    layer.node = new
    gm.graph.erase_node(n)
    for decoder in decoders:                     # the codes are decoded by the training form now
        if not decoder.users:
            gm.graph.erase_node(decoder)
    gm.recompile()
    return names


def _affine_name(layer: Layer, role: str) -> str:
    """The name the affine role's tensor has, or its codes' name without the suffix."""
    return layer.tensors[role] if role in layer.tensors else layer.tensors[f"{role}_codes"].removesuffix("_codes")


def shiftadd_lr_scale(gm, layer: Layer) -> float:
    """The learning-rate scale for what open_shiftadd trains. Affine code: 2^(1−q) for q bit planes — its scales
    are the grid's step and its offsets move in the same units, while the weights they stand for span about
    2^(q−1) steps either side of the offset, so the same relative change needs a 2^(q−1)-times smaller step
    (measured on SmolLM2 at 4 bits: lr 2e-4 raised the held-out loss, 2e-5 lowered it). The pow2 code's α: 1."""
    if not layer.affine:
        return 1.0
    return 2.0 ** (1 - int(layer.value(gm, "signs").shape[0]))


def close_shiftadd(gm, layer: Layer) -> None:
    """Put the packed op back: exponents re-derived from the trained α (pow2), or the trained scales and offsets
    rounded to their stored dtype (affine)."""
    n = layer.node
    if "alpha" in layer.tensors:
        alpha = get_attr_value(gm, layer.tensors["alpha"]).detach()
        exps, _ = bcq.snap_pow2(alpha, int(n.args[6]))
        params.set_tensor(gm, layer.tensors["exponents"], exps.to(torch.int8))
        x, signs, bias, in_f, group = n.args[0], n.args[2], n.args[3], n.args[4], n.args[5]
        trained = [layer.tensors.pop("alpha")]
    else:
        x, signs, _, bias, in_f, group = n.args[:6]
        trained = [layer.tensors.pop("levels")] if "levels" in layer.tensors else []
        for role in CODED:
            value = get_attr_value(gm, layer.tensors[f"{role}_train"]).detach()
            if role in layer.coded:
                groups, bits, signed = layer.coded[role]
                coded = group_codes.encode(value, bits, signed, layer.value(gm, f"{role}_steps").dtype)
                params.set_tensor(gm, layer.tensors[f"{role}_codes"], coded.codes)
                params.set_tensor(gm, layer.tensors[f"{role}_steps"], coded.steps)
            else:
                params.set_tensor(gm, layer.tensors[role], value.to(layer.value(gm, role).dtype))
            trained.append(layer.tensors.pop(f"{role}_train"))
    with gm.graph.inserting_before(n):
        args = (x, signs, params.get_attr_node(gm, layer.tensors["exponents"]), bias, in_f, group)
        if layer.affine:
            args += tuple(_affine_input(gm, layer, role) for role in CODED)
        new = gm.graph.call_function(shiftadd_linear.OP, args)
    new.meta.update({k: v for k, v in n.meta.items() if k != "val"})
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)
    layer.node = new
    for name in trained:
        params.remove_if_unused(gm, name)
    gm.recompile()


def _affine_input(gm, layer: Layer, role: str) -> fx.Node:
    """The node that feeds the op the role's values: its tensor, or the decoding of its codes."""
    if role not in layer.coded:
        return params.get_attr_node(gm, layer.tensors[role])
    codes, steps = (params.get_attr_node(gm, layer.tensors[f"{role}_{part}"]) for part in ("codes", "steps"))
    return gm.graph.call_function(group_values.OP, (codes, steps, *layer.coded[role]))


# ---- LoRA branches -------------------------------------------------------------------------------------------------
def add_branch(gm, node: fx.Node, x: fx.Node, out_f: int, in_f: int, rank: int, layer_tensor: str, seed: int,
               device, dtype) -> tuple[str, str, fx.Node]:
    """y ← y + x·Vᵀ·Uᵀ with U = 0 (m × r), V ~ N(0, 1/in) (r × n): (U's name, V's name, the add node).

    `layer_tensor` names a tensor of the layer; U and V are stored beside it. The branch and the add go right after
    `node` (x is defined before it), so every user of `node` — in whatever order they appear — sees the add."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = (torch.randn(rank, in_f, generator=gen, device="cpu") / in_f ** 0.5).to(device=device, dtype=dtype)
    u = torch.zeros(out_f, rank, device=device, dtype=dtype)
    u_name = params.add_tensor(gm, layer_tensor_name(layer_tensor, "heal_lora_u"), u, trainable=True)
    v_name = params.add_tensor(gm, layer_tensor_name(layer_tensor, "heal_lora_v"), v, trainable=True)
    users = list(node.users)
    u_node, v_node = params.get_attr_node(gm, u_name), params.get_attr_node(gm, v_name)
    after = node.next
    branch = insert_call(gm, after, lowrank_linear.OP, (x, u_node, v_node, None, None, 0),
                         pass_name="heal", rule="heal-lora")
    add = insert_call(gm, after, aten.add.Tensor, (node, branch), pass_name="heal", rule="heal-lora-add")
    for user in users:
        user.replace_input_with(node, add)
    gm.recompile()
    return u_name, v_name, add


def merge_branch(gm, weight_name: str, layout: str, u_name: str, v_name: str, add: fx.Node) -> None:
    """W += U·V (float64, rounded once) and the branch removed."""
    w = get_attr_value(gm, weight_name)
    delta = get_attr_value(gm, u_name).double() @ get_attr_value(gm, v_name).double()
    if layout == "in_out":
        delta = delta.t()
    params.set_tensor(gm, weight_name, (w.double() + delta).to(w.dtype))
    drop_branch(gm, u_name, v_name, add)


def drop_branch(gm, u_name: str, v_name: str, add: fx.Node) -> None:
    base, branch = add.args
    add.replace_all_uses_with(base)
    gm.graph.erase_node(add)
    gm.graph.erase_node(branch)
    params.remove_if_unused(gm, u_name)
    params.remove_if_unused(gm, v_name)
    gm.recompile()
