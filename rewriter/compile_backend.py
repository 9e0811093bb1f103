"""torch.compile backend that runs rewrite passes on the graph dynamo captured, then hands it to inductor.

    torch.compile(model, backend=rewriter.backend("lora-merge"))
    torch.compile(model, backend="rewrite", options={"passes": "lora-merge", "inner": "inductor"})

How: dynamo gives a graph whose parameters are placeholders (torch >= 2.5 inlines nn.Modules). We freeze those
placeholders into attributes (names recovered from dynamo's sources: L['self']._modules['fc']._parameters['weight']
-> "fc.weight"), export the graph (non-strict) so the passes see the same aten-level IR as on the CLI, run the
pipeline, and compile the result with the inner backend. The returned callable takes dynamo's full argument list
and drops the parameters, which are now constants.

Consequences (the same as inductor's freezing): weights are read once at compile time, so this path is for
inference; a pass that adds trainable parameters (lora) gives frozen adapters here — train through
`rewriter.rewrite(...)` instead. Graphs with symbolic shapes (dynamic=True) are compiled without rewriting and
a warning says so.
"""
from __future__ import annotations

import re
import warnings

import torch
from torch import fx

from . import params
from .errors import UserError, first_line
from .pass_base import parse_pipeline
from .pass_manager import run_passes

_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)")


def _qualname(source_name: str) -> str | None:
    """L['self']._modules['fc']._parameters['weight'] -> fc.weight (None when not a module attribute)."""
    if "_parameters[" not in source_name and "_buffers[" not in source_name:
        return None
    head = source_name.split("]", 1)[1] if source_name.startswith("L[") else source_name
    parts = [a or b for a, b in _SOURCE_PART.findall(head)]
    return ".".join(parts) or None


def _placeholder_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return _qualname(source.name) if source is not None else None


def freeze_parameters(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int]]:
    """Turn parameter/buffer placeholders into attributes of a copy of `gm` (dynamo reads the placeholders of the
    graph it handed us after we return, so that one must stay as it was); return the copy and the positions of
    user inputs."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    gm = fx.GraphModule(gm, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_positions = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        name = _placeholder_name(node)
        if name is None or not isinstance(value, torch.Tensor):
            user_positions.append(i)
            continue
        attr = params.add_tensor(gm, name, value.detach())
        with gm.graph.inserting_before(node):
            get = gm.graph.get_attr(attr)
        node.replace_all_uses_with(get)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, user_positions


def _flatten_codegen(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's pytree wrapper and guard call so the module takes and returns flat tensors."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph._codegen = fx.graph.CodeGen()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0]
    output.args = (tuple(outs) if isinstance(outs, (list, tuple)) else (outs,),)
    gm.recompile()
    return gm


def _inner_compiler(inner):
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, inputs: gm.forward
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx
    from torch._dynamo import lookup_backend
    return lookup_backend(inner)


def backend(passes="", *, inner="inductor", verify: bool = False):
    """A torch.compile backend running `passes` (spec string or Pass objects), then `inner`
    ("inductor", "eager", another registered backend name, or a backend callable)."""
    pipeline = parse_pipeline(passes) if passes else []

    def compile_fn(gm: fx.GraphModule, example_inputs):
        if any(not isinstance(x, torch.Tensor) for x in example_inputs) or any(
                isinstance(s, torch.SymInt) for x in example_inputs if isinstance(x, torch.Tensor) for s in x.shape):
            warnings.warn("rewrite backend: graphs with symbolic shapes are not rewritten; compile with "
                          "dynamic=False to apply the passes", stacklevel=2)
            return _inner_compiler(inner)(gm, example_inputs)
        gm, user_positions = freeze_parameters(gm, list(example_inputs))
        user_inputs = [example_inputs[i] for i in user_positions]
        try:
            ep = torch.export.export(gm, tuple(user_inputs), strict=False)
        except Exception as e:
            raise UserError(f"rewrite backend: the captured graph does not export ({first_line(e)})") from e
        working = ep.module()
        compile_fn.report = run_passes(working, user_inputs, pipeline, verify=verify)
        working = _flatten_codegen(working)
        # The inner compiler must not see dynamo's tracing context: it describes the graph before parameters were
        # frozen (inductor would read the wrong input list from it).
        with torch._guards.tracing(None):
            compiled = _inner_compiler(inner)(working, user_inputs)

        def run(*args):
            return compiled(*[args[i] for i in user_positions])

        return run

    compile_fn.report = None
    return compile_fn


def rewrite_backend(gm, example_inputs, options: dict | None = None, mode=None):
    """The `rewrite` backend registered through the torch_dynamo_backends entry point."""
    options = dict(options or {})
    fn = backend(options.pop("passes", ""), inner=options.pop("inner", "inductor"),
                 verify=bool(options.pop("verify", False)))
    if options:
        raise UserError(f"unknown rewrite backend option(s): {', '.join(options)}; valid: passes, inner, verify")
    return fn(gm, example_inputs)
