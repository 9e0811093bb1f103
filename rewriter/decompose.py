"""`--decompose`: lower this package's custom ops to plain aten ops, for consumers that don't import rewriter.

Each op module's `reference` is traced with make_fx on the node's fake inputs and inlined in place of the node.
"""
from __future__ import annotations

from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from . import ops as custom_ops
from .verify import propagate_shapes


def decompose_custom_ops(gm: fx.GraphModule, inputs: list) -> int:
    """Replace every rewrite:: op node by its reference implementation's aten graph; returns how many."""
    propagate_shapes(gm, inputs)
    count = 0
    for node in list(gm.graph.nodes):
        module = custom_ops.module_for(node.target) if node.op == "call_function" else None
        if module is None:
            continue
        count += 1
        flat, spec = pytree.tree_flatten((node.args, node.kwargs))   # nodes inside lists too (Tensor[] arguments)
        positions = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]
        tensor_args = [flat[i] for i in positions]
        fakes = [a.meta["val"] for a in tensor_args]

        def call(*tensors, _flat=flat, _spec=spec, _positions=positions, _ref=module.reference):
            full = list(_flat)
            for i, t in zip(_positions, tensors):
                full[i] = t
            args, kwargs = pytree.tree_unflatten(full, _spec)
            return _ref(*args, **kwargs)

        sub = make_fx(call, tracing_mode="fake")(*fakes)
        env = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, arg in zip(placeholders, tensor_args):
            env[ph] = arg
        with gm.graph.inserting_before(node):
            for sub_node in sub.graph.nodes:
                if sub_node.op == "placeholder":
                    continue
                if sub_node.op == "output":
                    result = env[sub_node.args[0]] if isinstance(sub_node.args[0], fx.Node) else None
                    break
                if sub_node.op == "get_attr":  # constants created while tracing
                    value = getattr(sub, sub_node.target)
                    name = f"_decomposed_const_{count}_{sub_node.target}"
                    gm.register_buffer(name, value)
                    env[sub_node] = gm.graph.get_attr(name)
                    continue
                env[sub_node] = gm.graph.node_copy(sub_node, lambda n: env[n])
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return count
