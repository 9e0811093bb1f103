"""What the LoRA passes share: adapter names, the layer model (read a LoRA layer from the graph, write it back).

A LoRA layer is one op node in one of two forms:

    fixed        rewrite.lora_linear(x, W, b, A, B, s[, x_a])            one always-on adapter ("default"), the form
                                                                          `lora` gives by default (fused kernel)
    switchable   rewrite.multi_lora_linear(x, W?, b?, base?, [A…], [B…], [m…], names, [s…], [g…], [id…],
                                           [dora…], index?, x_a?)         named adapters, gates, DoRA, a row index,
                                                                          structured bases (rewriter/ops/multi_lora_linear.py)

`read_layer` turns either into a `LoraLayer` (a list of `Adapter`s plus the base); passes edit that and
`write_layer` emits the right form: fixed when the layer holds exactly one plain, always-on "default" adapter on a
dense weight and was fixed before, switchable otherwise.

Tensor names, for a layer whose weight is `<layer>.weight` and an adapter named NAME (suffix "" for "default",
"_NAME" otherwise; at the root of a one-layer model: `weight_lora_A…`):
    <layer>.lora_A<sfx>, lora_B<sfx>      A (r, in), B (out, r): Parameters while unmerged, buffers once merged
    <layer>.lora_magnitude<sfx>           DoRA magnitude m (out,) (PEFT's lora_magnitude_vector)
    <layer>.lora_merged                   fixed form merged: float64 [scale, dropout]
    <layer>.lora_folded<sfx>              switchable form merged: float64 [scale, gate, id, order, dropout, has_index,
                                          slot] — one per adapter folded into the weight
    <layer>.lora_norm<sfx>                DoRA adapter folded: its ‖W₀ + Δ‖_row (float64), needed to undo the merge
    <layer>.lora_correction               integer ulp correction of the merged weight (rewriter/lora_fold.py)
    lora_index                            (root) int64 row index of mixed-adapter batches; empty = gated mode
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from . import params
from .errors import UserError
from .ir import get_attr_value, insert_call
from .lora_fold import delta, dora_norm, dora_step, merge_weight, plain_step, unmerge_weight  # noqa: F401
from .matchers.linear import LinearSite, layer_tensor_name

aten = torch.ops.aten
LORA_OP = torch.ops.rewrite.lora_linear.default
MULTI_OP = torch.ops.rewrite.multi_lora_linear.default
LORA_OPS = (LORA_OP, MULTI_OP)
DEFAULT = "default"
INDEX_BUFFER = "lora_index"
# rewrite:: ops of compressed layers that adapters can sit on (QLoRA-style): name -> index of their first weight
STRUCTURED_BASES = ("shiftadd_linear", "monarch_linear", "blockdiag_linear", "lowrank_linear")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(name: str, what: str = "adapter name") -> str:
    if not _NAME.fullmatch(name or ""):
        raise UserError(f"{what} {name!r} must be an identifier (letters, digits, _; not starting with a digit)")
    return name


def suffix(name: str) -> str:
    return "" if name == DEFAULT else f"_{name}"


def layer_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] if "." in weight_name else weight_name


def adapter_names(weight_name: str, name: str = DEFAULT) -> dict[str, str]:
    """Names of the tensors of adapter `name` on the layer whose weight (or first stored tensor) is `weight_name`."""
    sfx = suffix(name)
    out = {k: layer_tensor_name(weight_name, f"lora_{k}{sfx}") for k in ("A", "B", "magnitude", "folded", "norm")}
    out.update({k: layer_tensor_name(weight_name, f"lora_{k}") for k in ("merged", "correction")})
    return out


def name_from_tensor(qualname: str, kind: str = "A") -> str:
    """Adapter name from a tensor name: `…lora_A` -> default, `…lora_A_x` -> x."""
    tail = qualname.rsplit(".", 1)[-1]
    tag = f"lora_{kind}"
    at = tail.rfind(tag)
    rest = tail[at + len(tag):] if at >= 0 else ""
    return rest[1:] if rest.startswith("_") else DEFAULT


def is_lora_tensor(qualname: str) -> bool:
    tail = qualname.rsplit(".", 1)[-1]
    return tail.startswith("lora_") or "_lora_" in tail


@dataclass
class Adapter:
    name: str
    a: str                      # qualified names of the stored tensors
    b: str
    scale: float
    gate: float = 1.0
    id: int = -1
    magnitude: str | None = None

    @property
    def dora(self) -> bool:
        return self.magnitude is not None


@dataclass
class LoraLayer:
    """One LoRA layer as passes see it. `node` is what write_layer replaces: the op node of an existing layer, the
    linear node of a new one, or the structured base node (kept; its users move to the adapter op)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node | None                # W as (out, in): a get_attr, or aten.t of one (GPT-2 Conv1D storage)
    bias: object
    base: fx.Node | None = None           # a structured layer's output (weight is None then)
    adapters: list[Adapter] = field(default_factory=list)
    index: fx.Node | None = None
    adapter_input: fx.Node | None = None  # dropout(x)
    fixed: bool = False

    @property
    def storage(self) -> tuple[fx.Node | None, bool]:
        """(get_attr node of the stored weight, stored transposed?)"""
        w = self.weight
        if w is None:
            return None, False
        if w.op == "call_function" and w.target in (aten.t.default, aten.permute.default):
            return w.args[0], True
        return w, False

    @property
    def key(self) -> str:
        """The tensor new adapter tensors are named after: the weight, or a structured layer's first tensor."""
        storage, _ = self.storage
        if storage is not None:
            return storage.target
        return next(a.target for a in self.base.all_input_nodes if a.op == "get_attr")

    @property
    def name(self) -> str:
        return layer_of(self.key)

    @property
    def dropout(self) -> float:
        return float(self.adapter_input.args[1]) if self.adapter_input is not None else 0.0

    def find(self, name: str) -> Adapter | None:
        return next((a for a in self.adapters if a.name == name), None)

    def can_be_fixed(self) -> bool:
        return (self.weight is not None and len(self.adapters) == 1 and self.adapters[0].name == DEFAULT
                and not self.adapters[0].dora and self.adapters[0].gate == 1.0 and self.index is None)


def is_lora_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LORA_OPS


def structured_ops() -> dict:
    """{OpOverload: name} of the structured base ops defined in this process."""
    out = {}
    for name in STRUCTURED_BASES:
        packet = getattr(torch.ops.rewrite, name, None)
        if packet is not None:
            out[packet.default] = name
    return out


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def read_layer(node: fx.Node) -> LoraLayer:
    """The LoraLayer of a rewrite.lora_linear / rewrite.multi_lora_linear node."""
    if node.target == LORA_OP:
        x, w, b, a, bb, s = node.args[:6]
        xa = _arg(node, 6, "adapter_input")
        return LoraLayer(node, x, w, b, adapters=[Adapter(DEFAULT, a.target, bb.target, float(s))],
                         adapter_input=xa, fixed=True)
    x, w, b, base, la, lb, mags, names, scales, gates, ids, dora = node.args[:12]
    index, xa = _arg(node, 12, "index"), _arg(node, 13, "adapter_input")
    adapters = []
    for k, name in enumerate(names.split(",") if names else []):
        adapters.append(Adapter(name, la[k].target, lb[k].target, float(scales[k]), float(gates[k]), int(ids[k]),
                                mags[dora[k]].target if dora[k] >= 0 else None))
    return LoraLayer(node, x, w, b, base, adapters, index, xa, fixed=False)


def lora_layers(gm: fx.GraphModule) -> list[LoraLayer]:
    return [read_layer(n) for n in gm.graph.nodes if is_lora_node(n)]


def weight_out_in_node(gm: fx.GraphModule, site: LinearSite, *, pass_name: str, rule: str) -> fx.Node:
    """A node giving W as (out, in): the get_attr itself, or aten.t of it for (in, out) storage."""
    if site.layout == "out_in":
        return site.weight
    return insert_call(gm, site.node, aten.t.default, (site.weight,), pass_name=pass_name, rule=rule)


def layer_from_site(gm: fx.GraphModule, site: LinearSite, *, pass_name: str, rule: str) -> LoraLayer:
    """A new (adapter-less) layer for a plain linear site."""
    w = weight_out_in_node(gm, site, pass_name=pass_name, rule=rule)
    return LoraLayer(site.node, site.x, w, site.bias)


def layer_from_structured(node: fx.Node) -> LoraLayer:
    """A new (adapter-less) layer whose base is a structured op's output (its x is the op's first argument)."""
    return LoraLayer(node, node.args[0], None, None, base=node)


def write_layer(gm: fx.GraphModule, layer: LoraLayer, *, pass_name: str, rule: str) -> fx.Node:
    """Emit the layer's op (see the module docstring for the form) in place of `layer.node`; returns the new node."""
    if not layer.adapters:
        raise AssertionError("write_layer needs at least one adapter")
    get = lambda name: params.get_attr_node(gm, name)  # noqa: E731
    fixed = layer.fixed and layer.can_be_fixed()
    if fixed:
        ad = layer.adapters[0]
        args = [layer.x, layer.weight, layer.bias, get(ad.a), get(ad.b), float(ad.scale)]
        if layer.adapter_input is not None:
            args.append(layer.adapter_input)
        target = LORA_OP
    else:
        mags = [a.magnitude for a in layer.adapters if a.dora]
        dora, j = [], 0
        for a in layer.adapters:
            dora.append(j if a.dora else -1)
            j += a.dora
        args = [layer.x, layer.weight, layer.bias, layer.base, [get(a.a) for a in layer.adapters],
                [get(a.b) for a in layer.adapters], [get(m) for m in mags], ",".join(a.name for a in layer.adapters),
                [float(a.scale) for a in layer.adapters], [float(a.gate) for a in layer.adapters],
                [int(a.id) for a in layer.adapters], dora, layer.index, layer.adapter_input]
        target = MULTI_OP
    layer.fixed = fixed
    keep_old = layer.base is not None and layer.node is layer.base
    before = layer.node.next if keep_old else layer.node
    new = insert_call(gm, before, target, tuple(args), pass_name=pass_name, rule=rule, replaces=layer.node)
    if "val" in layer.node.meta:   # same output; the next layer of this pass may read its shape (two in a row)
        new.meta["val"] = layer.node.meta["val"]
    if keep_old:
        layer.node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    else:
        layer.node.replace_all_uses_with(new)
        gm.graph.erase_node(layer.node)
    layer.node = new
    return new


def add_dropout(gm: fx.GraphModule, layer: LoraLayer, p: float, *, pass_name: str, rule: str) -> None:
    """Give the layer's adapters dropout(x) as input (training programs); every adapter of the layer reads it."""
    if p > 0 and layer.adapter_input is None:
        layer.adapter_input = insert_call(gm, layer.node if layer.base is not layer.node else layer.node.next,
                                          aten.dropout.default, (layer.x, float(p), True), pass_name=pass_name,
                                          rule=rule)


def index_node(gm: fx.GraphModule) -> fx.Node:
    """The get_attr node of the program's row-index buffer (created empty: gated mode)."""
    if not params.has_attr(gm, INDEX_BUFFER):
        device = next((t.device for t in gm.parameters()), torch.device("cpu"))
        params.add_tensor(gm, INDEX_BUFFER, torch.zeros(0, dtype=torch.int64, device=device))
    return params.get_attr_node(gm, INDEX_BUFFER)


def build_lora_node(gm: fx.GraphModule, site: LinearSite, a_name: str, b_name: str, scale: float,
                    dropout: float, *, pass_name: str, rule: str) -> fx.Node:
    """Insert rewrite::lora_linear(x, W, b, A, B, scale[, dropout(x)]) computing the same layer plus adapter."""
    layer = layer_from_site(gm, site, pass_name=pass_name, rule=rule)
    layer.adapters.append(Adapter(DEFAULT, a_name, b_name, float(scale)))
    layer.fixed = True
    add_dropout(gm, layer, dropout, pass_name=pass_name, rule=rule)
    return write_layer(gm, layer, pass_name=pass_name, rule=rule)


def shared_readers(gm: fx.GraphModule, weight_name: str, node: fx.Node) -> list[fx.Node]:
    """Ops other than `node` (and the t() views feeding it) that read this weight under any name."""
    own = {node} | {u for u in node.all_input_nodes if u.op == "call_function" and u.target == aten.t.default}
    return [r for r in params.readers(gm, weight_name) if r not in own]


def tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    return get_attr_value(gm, name).detach()


def program_adapters(gm: fx.GraphModule) -> dict[str, list[LoraLayer]]:
    """adapter name -> the layers holding it (unmerged)."""
    out: dict[str, list[LoraLayer]] = {}
    for layer in lora_layers(gm):
        for a in layer.adapters:
            out.setdefault(a.name, []).append(layer)
    return out


def parse_adapter_list(text: str, *, weights: bool = False, what: str = "adapters") -> list[tuple[str, float]]:
    """"a:0.7,b:0.3" (separators , + ; or spaces; weight after ':' when `weights`) -> [(name, weight)]."""
    out = []
    for item in re.split(r"[,+;\s|]+", text.strip()):
        if not item:
            continue
        name, _, w = item.partition(":")
        if w and not weights:
            raise UserError(f"{what}: {item!r} — no weights here, give names only")
        try:
            value = float(w) if w else 1.0
        except ValueError:
            raise UserError(f"{what}: bad weight in {item!r} (expected NAME:NUMBER)") from None
        check_name(name.strip(), f"{what}: adapter name")
        if any(n == name.strip() for n, _ in out):
            raise UserError(f"{what}: adapter {name.strip()!r} is listed twice")
        out.append((name.strip(), value))
    return out


class ContractByOptions:
    """A pass's `contract` that depends on its options: the class attribute reads `default` (what `rewrite passes`
    lists), an instance reads `fn(self)` — e.g. `lora` is exact when it inserts B = 0 and semantic when it loads an
    adapter that changes the function on purpose."""

    def __init__(self, default, fn):
        self.default, self.fn = default, fn

    def __get__(self, obj, owner=None):
        return self.default if obj is None else self.fn(obj)


def layer_tensors(gm: fx.GraphModule, key: str, kind: str) -> dict[str, str]:
    """{adapter name: qualified name} of the layer's stored tensors `lora_<kind><sfx>` (e.g. kind "folded")."""
    prefix = layer_tensor_name(key, f"lora_{kind}")
    out = {}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name == prefix:
            out[DEFAULT] = name
        elif name.startswith(prefix + "_") and _NAME.fullmatch(name[len(prefix) + 1:]):
            out[name[len(prefix) + 1:]] = name
    return out


# ---- merging ----------------------------------------------------------------------------------------------
_RECORD = re.compile(r"(^|_)lora_(merged|folded)")


def merged_records(gm) -> list[str]:
    """Names of the merge records (fixed `lora_merged`, switchable `lora_folded*`) in the program."""
    return [n for n, _ in gm.named_buffers() if _RECORD.search(n.rsplit(".", 1)[-1])]


def dense_node(gm, node, x, w_node, bias, *, pass_name: str, rule: str):
    """aten.linear(x, W, b), or GPT-2's aten.addmm(b, x2d, W_io) / aten.mm when W is stored (in, out)."""
    transposed = w_node.op == "call_function"
    storage = w_node.args[0] if transposed else w_node
    x_val = x.meta.get("val")
    if transposed and x_val is not None and x_val.ndim == 2:
        if bias is not None:
            new = insert_call(gm, node, aten.addmm.default, (bias, x, storage), pass_name=pass_name, rule=rule,
                              replaces=node)
        else:
            new = insert_call(gm, node, aten.mm.default, (x, storage), pass_name=pass_name, rule=rule, replaces=node)
    else:
        new = insert_call(gm, node, aten.linear.default, (x, w_node, bias), pass_name=pass_name, rule=rule,
                          replaces=node)
    if "val" in node.meta:
        new.meta["val"] = node.meta["val"]
    return new


def fold_steps(gm: fx.GraphModule, adapters: list[Adapter], weight_oi: torch.Tensor):
    """(steps, DoRA norms by adapter name) of `adapters` on the layer, W₀ = weight_oi (out, in)."""
    steps, norms = [], {}
    for a in adapters:
        d = delta(tensor(gm, a.a), tensor(gm, a.b), a.scale)
        if a.dora:
            norms[a.name] = dora_norm(weight_oi, d)
            steps.append(dora_step(d, tensor(gm, a.magnitude), norms[a.name], a.gate))
        else:
            steps.append(plain_step(d, a.gate))
    return steps, norms


def to_buffer(gm, name: str) -> None:
    """A Parameter (an adapter tensor) becomes a plain buffer with the same value."""
    value = get_attr_value(gm, name).detach()
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name and not n.users]:
        gm.graph.erase_node(n)
    params.remove_if_unused(gm, name)
    params.add_tensor(gm, name, value)
