"""Fully sharded data parallel training of an exported program — PyTorch's FSDP2 (`fully_shard`), nothing else.

    torchrun --nproc_per_node 8 -m rewriter.cli MODEL --pass "monarch{blocks=4},heal{shard=true}" -o out.pt2

FSDP wraps modules: it gathers a module's parameters in a hook before that module's forward and frees them after.
An exported program has no modules to hook — its graph reads every weight through a `get_attr` node — so wrapping
the program itself would gather the whole model at once. `shard_program` therefore builds a training copy of the
program made of units:

1. every tensor the graph reads becomes the parameter (or buffer) of a one-tensor holder module, read through
   one `call_module` node placed just before its first user (tied weights — one tensor under several names — get
   one holder, so FSDP never sees a tensor twice);
2. the graph is cut, in its own order, into `units` consecutive pieces of about equal parameter bytes
   (torch.fx.passes.split_module), each a submodule the root calls — so FSDP's hooks fire once per unit;
3. each unit is `fully_shard`-ed over all ranks, then the root (which holds no tensor: it drives the units).

During training a rank holds its 1/W shard of every tensor, of its gradient and of AdamW's two states, plus the
gathered weights of the unit running (FSDP may gather the next one early); gradients are reduce-scattered, i.e. averaged
over the ranks exactly as DDP averages them. A unit whose tensor is also read by a later unit (a tied embedding
and LM head) keeps its weights gathered until backward (`reshard_after_forward=False`): a later unit reads them.

The training copy's tensors are new (sharded) parameters: the program itself is not touched until
`gather_into` copies the trained values back, full, on every rank. The copy shares nothing it writes with the
program, so heal's undo snapshot stays valid.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import fx, nn

from rewriter import distributed
from rewriter.errors import UserError
from rewriter.ir import get_attr_value


class Holder(nn.Module):
    """One tensor of the program as a module: `value` (a parameter, or a buffer for a non-parameter tensor). FSDP
    shards contiguous parameters only: a strided one (a transposed factor) is held as a contiguous copy."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        if isinstance(tensor, nn.Parameter):
            self.value = tensor if tensor.is_contiguous() else \
                nn.Parameter(tensor.detach().contiguous(), requires_grad=tensor.requires_grad)
        else:
            self.register_buffer("value", tensor)

    def forward(self):
        return self.value


class Sharded:
    """A program's training copy under FSDP: `module` (call it like the program), `tensors` (the program's tensor
    name → the copy's sharded parameter holding it), `units` (how many pieces FSDP gathers one at a time)."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor], units: int, device: torch.device):
        self.module, self.tensors, self.units, self.device = module, tensors, units, device

    def __call__(self, *args, **kwargs):
        flat = pytree.tree_leaves((args, kwargs))          # the program's placeholder order
        with warnings.catch_warnings():     # "returned a view": no unit writes into its inputs (_refuse_in_place)
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            return self.module(*[t.to(self.device) if isinstance(t, torch.Tensor) else t for t in flat])

    def local_fraction(self) -> float:
        """This rank's share of the sharded parameters' elements (≈ 1/W)."""
        local = total = 0
        for p in self.module.parameters():
            local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            total += p.numel()
        return local / max(1, total)


def shard_program(gm: fx.GraphModule, units: int) -> Sharded:
    """The training copy of `gm` in `units` FSDP units over every rank of the default process group (see the
    module docstring). `gm` is not modified; its tensors are not written to."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.fx.passes.split_module import split_module

    graph = copy.deepcopy(gm.graph)
    graph._codegen = fx.graph.CodeGen()         # flat inputs and outputs (the program's pytree specs dropped)
    work = fx.GraphModule(gm, graph)           # references to gm's tensors; replaced by holders below
    holders_by_id = _tensor_holders(gm, work)
    holder_bytes = {node: _holder_bytes(work, node) for node in work.graph.nodes
                    if node.op == "call_module" and node.target.startswith("tensor_")}
    total = sum(holder_bytes.values()) or 1
    units = max(1, min(units, len(holder_bytes)))
    part, used = {}, 0
    for node in work.graph.nodes:       # cut in graph order at every 1/units of the bytes; a holder joins its user
        if node.op in ("placeholder", "output") or node in holder_bytes:
            continue
        part[node] = min(units - 1, used * units // total)
        for arg in node.all_input_nodes:
            if arg in holder_bytes and arg not in part:
                part[arg] = part[node]
                used += holder_bytes[arg]
    split = split_module(work, None, lambda n: part[n], keep_original_order=True)
    _refuse_in_place(split)
    device = distributed.wire()             # this rank's GPU under nccl (the program may stay on the CPU)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    exported = _units_read_later(split)
    pieces = {name: piece for name, piece in split.named_children() if name.startswith("submod_")}
    for name, piece in pieces.items():
        if any(True for _ in piece.parameters()):
            fully_shard(piece, mesh=mesh, reshard_after_forward=name not in exported)
    fully_shard(split, mesh=mesh)
    holders = {name: holder for piece in pieces.values() for name, holder in piece.named_children()
               if isinstance(holder, Holder)}
    tensors = {}                                # every name of a tensor the graph reads, tied names included
    bound = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in bound:
        if id(t) in holders_by_id:
            tensors[name] = holders[holders_by_id[id(t)]].value
    return Sharded(split, tensors, len(pieces), device)


def gather_into(gm: fx.GraphModule, sharded: Sharded, names: list[str]) -> None:
    """Write the full trained values of `names` back into the program's own tensors (a collective: every rank
    calls it with the same names, in the same order; afterwards every rank holds the same values)."""
    for name in names:
        value = sharded.tensors.get(name)
        if value is None:                       # a tensor the graph does not read: it did not train
            continue
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        target = get_attr_value(gm, name)
        with torch.no_grad():
            target.copy_(full.to(target.device, target.dtype))


# ---- building the training copy ------------------------------------------------------------------------------------
def _tensor_holders(gm: fx.GraphModule, work: fx.GraphModule) -> dict[int, str]:
    """Replace every get_attr of a tensor in `work` by a call_module of a Holder of that tensor (one per tensor
    object), placed before the tensor's first user; returns id(tensor) → holder name for the tensors read."""
    holder_of: dict[int, str] = {}
    by_tensor: dict[int, list[fx.Node]] = {}
    for node in list(work.graph.nodes):
        if node.op != "get_attr":
            continue
        value = get_attr_value(gm, node.target)
        if not isinstance(value, torch.Tensor):         # a submodule read as such (rare): `work` has it already
            continue
        by_tensor.setdefault(id(value), []).append(node)
    order = {node: i for i, node in enumerate(work.graph.nodes)}
    for nodes in by_tensor.values():
        users = [u for n in nodes for u in n.users]
        if users:
            value = get_attr_value(gm, nodes[0].target)
            holder_name = f"tensor_{len(holder_of)}"
            holder_of[id(value)] = holder_name
            work.add_module(holder_name, Holder(value))
            with work.graph.inserting_before(min(users, key=order.__getitem__)):
                call = work.graph.call_module(holder_name)
        for n in nodes:
            if users:
                n.replace_all_uses_with(call)
            work.graph.erase_node(n)
    work.graph.lint()
    work.recompile()
    return holder_of


def _refuse_in_place(split: nn.Module) -> None:
    """FSDP hooks a unit's outputs for backward; a later in-place write into one (a view of a gathered weight, or an
    activation) would bypass the hook. Exported programs are functional; one that is not is refused."""
    for piece in split.children():
        if not isinstance(piece, fx.GraphModule):
            continue
        for node in piece.graph.nodes:
            schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
            writes = schema is not None and any(a.alias_info is not None and a.alias_info.is_write
                                                for a in schema.arguments)
            if writes:
                raise UserError(f"heal{{shard=true}}: the program writes in place ({node.target}), which FSDP's "
                                f"units cannot track; re-export it functionally, or heal without shard=true")


def _holder_bytes(work: fx.GraphModule, node: fx.Node) -> int:
    module = work.get_submodule(node.target)
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _units_read_later(split: fx.GraphModule) -> set[str]:
    """Units that pass one of their tensors (a holder's output) on to a later unit: they must stay gathered."""
    out = set()
    for node in split.graph.nodes:
        if node.op != "call_module" or not node.target.startswith("submod_"):
            continue
        piece = split.get_submodule(node.target)
        returned = next(n for n in piece.graph.nodes if n.op == "output").args[0]
        flat = returned if isinstance(returned, (tuple, list)) else (returned,)
        if any(isinstance(r, fx.Node) and r.op == "call_module" and isinstance(piece.get_submodule(r.target), Holder)
               for r in flat):
            out.add(node.target)
    return out
