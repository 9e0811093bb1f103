"""Parameter surgery on the working GraphModule — the only place that adds, replaces or removes weights.

A pass that turns W into (A, B) calls `add_tensor` twice, builds new `get_attr` nodes with `get_attr_node`,
rewires the graph, then `remove_if_unused(W)`. Tied weights (one tensor reachable under several names, or one
name read by several ops) stay alive while anything still reads them; the final `torch.export` rebuilds the
signature and state dict from the module, so graph, signature and state dict cannot drift apart.
"""
from __future__ import annotations

import torch
from torch import fx

from .ir import get_attr_value, owner_and_attr


def has_attr(gm: fx.GraphModule, qualname: str) -> bool:
    try:
        get_attr_value(gm, qualname)
        return True
    except AttributeError:
        return False


def unique_name(gm: fx.GraphModule, qualname: str) -> str:
    """`qualname`, or `qualname_1`, `qualname_2`, ... — the first one that is free."""
    if not has_attr(gm, qualname):
        return qualname
    i = 1
    while has_attr(gm, f"{qualname}_{i}"):
        i += 1
    return f"{qualname}_{i}"


def add_tensor(gm: fx.GraphModule, qualname: str, value: torch.Tensor, *, trainable: bool = False,
               persistent: bool = True) -> str:
    """Register `value` at `qualname` (a free name is chosen if taken); a Parameter when `trainable` else a buffer.

    Returns the name used. Missing parent modules are created as empty `nn.Module`s.
    """
    qualname = unique_name(gm, qualname)
    *path, attr = qualname.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    value = value.detach()
    if trainable:
        owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=True))
    else:
        owner.register_buffer(attr, value, persistent=persistent)
    return qualname


def set_tensor(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """Replace the value stored at `qualname` in place of the old one, keeping its kind (parameter or buffer)
    and its requires_grad flag. Aliases under other names are NOT updated: check `aliases` first."""
    owner, attr = owner_and_attr(gm, qualname)
    old = getattr(owner, attr)
    value = value.detach()
    if isinstance(old, torch.nn.Parameter):
        owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
        owner.register_buffer(attr, value, persistent=persistent)


def set_tied(gm: fx.GraphModule, names: list[str], value: torch.Tensor) -> None:
    """`set_tensor` under names[0], then bind that same object under every other name (tied weights stay tied:
    one tensor, several names)."""
    set_tensor(gm, names[0], value)
    obj = get_attr_value(gm, names[0])
    for name in names[1:]:
        owner, attr = owner_and_attr(gm, name)
        if isinstance(obj, torch.nn.Parameter):
            owner.register_parameter(attr, obj)
        else:
            persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
            if attr in owner._parameters:
                del owner._parameters[attr]
            owner.register_buffer(attr, obj, persistent=persistent)


def make_trainable(gm: fx.GraphModule, qualname: str, trainable: bool) -> None:
    """Turn a buffer into a Parameter (trainable=True) or a Parameter into a buffer (trainable=False)."""
    owner, attr = owner_and_attr(gm, qualname)
    value = getattr(owner, attr).detach()
    delattr(owner, attr)
    if trainable:
        owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=True))
    else:
        owner.register_buffer(attr, value)


def get_attr_node(gm: fx.GraphModule, qualname: str) -> fx.Node:
    """A `get_attr` node for `qualname`, reusing an existing one (placed first in the graph) if there is one."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == qualname:
            return node
    first_compute = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first_compute):
        node = gm.graph.get_attr(qualname)
    value = get_attr_value(gm, qualname)
    node.meta["val"] = value  # real tensor; FakeTensorProp replaces it with a fake one
    return node


def aliases(gm: fx.GraphModule, qualname: str) -> list[str]:
    """Every parameter/buffer name bound to the same tensor object as `qualname` (itself included)."""
    target = get_attr_value(gm, qualname)
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return [name for name, t in named if t is target]


def readers(gm: fx.GraphModule, qualname: str) -> list[fx.Node]:
    """Ops that read the tensor at `qualname` under any of its names (tied weights included)."""
    names = set(aliases(gm, qualname))
    out: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in names:
            out.extend(node.users)
    return out


def remove_if_unused(gm: fx.GraphModule, qualname: str) -> bool:
    """Delete the attribute `qualname` and its get_attr nodes when no op reads them any more.

    Returns True when removed. A tied weight read through another name stays.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == qualname]
    if any(n.users for n in nodes):
        return False
    for n in nodes:
        gm.graph.erase_node(n)
    owner, attr = owner_and_attr(gm, qualname)
    if hasattr(owner, attr):
        delattr(owner, attr)
    return True


def state_snapshot(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> (tensor, trainable) of every parameter and buffer; used to record what a pass changed
    (a replaced tensor is a different object; trainable = a Parameter with requires_grad)."""
    snap = {name: (p, p.requires_grad) for name, p in gm.named_parameters(remove_duplicate=False)}
    snap.update({name: (b, False) for name, b in gm.named_buffers(remove_duplicate=False)})
    return snap
