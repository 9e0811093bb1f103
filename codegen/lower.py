"""`codegen.lower(gm, inputs, report, dump_dir=None)`: replace rewrite:: ops and fusible regions of the working
GraphModule by `rewrite_triton::` ops that launch Triton kernels.

    rewrite.lora_linear(x, W, b, A, B, s) [-> gelu] [-> add(·, res)]
        -> rewrite_triton.lora_linear(x, W, b, A, B, s, xa, "gelu", res)     (rule "template:lora_linear")
    rewrite.two_pass_softmax(x, dim) -> rewrite_triton.two_pass_softmax(x, dim)   (when that op exists)
    rewrite.<op>(args) [-> gelu] [-> add(·, res)] -> rewrite_triton.<op>(args, "gelu", res)
        for the structured linears monarch_linear, blockdiag_linear, lowrank_linear (EPILOGUE_OPS; site kernel
        e.g. "monarch_linear[gelu,+residual]")
    rewrite.<op>(args) -> rewrite_triton.<op>(args)   same signature, for the other ops in SAME_SIGNATURE:
        vq_logits, shiftadd_linear, softplus_attention, multi_lora_linear (kernel lora_batch)
        (rule "template:<kernel>")
    pointwise ops … [-> sum/amax/mean(dim=-1)] -> rewrite_triton.region([inputs], spec)   (rule "generated:region")

The report gets one PassResult named "codegen" with a site per lowered node, its kernel and "impl": which
implementation codegen.select runs there (measured on the first call per shape bucket on a GPU — lowering runs
the program once on the example inputs so the report can say — with the winner's speed-up over the aten path),
or why nothing was measured. When the report was verified (rewrite(..., verify=True)), the lowered graph is run
on the example inputs and must match the graph before lowering within the exact tolerance, else
VerificationError.
"""
from __future__ import annotations

import inspect
import json
import time

import torch
from torch import fx

from rewriter import cost
from rewriter.errors import VerificationError
from rewriter.ir import insert_call
from rewriter.pass_manager import NodeChange, PassResult
from rewriter.verify import exact_tolerance, propagate_shapes, relative_error, run_graph

from . import cache, generate, select
from . import ops as kops
from .pointwise_table import pointwise_rule
from .regions import find_regions
from .runtime import backend_note
from .templates import blockdiag_linear as blockdiag_t
from .templates import gemm as gemm_t
from .templates import lora_batch as lora_batch_t
from .templates import lora_linear as lora_t
from .templates import monarch_linear as monarch_t
from .templates import shiftadd_linear as shiftadd_t
from .templates import softmax as softmax_t
from .templates import softplus_attention as softplus_t
from .templates import vq_logits as vq_t

aten = torch.ops.aten
PASS = "codegen"


def _bound(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _val(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _only_user(n: fx.Node):
    return next(iter(n.users)) if len(n.users) == 1 else None


def _epilogue(node: fx.Node):
    """(activation, residual node, nodes folded in, tail) for the pointwise epilogue following a linear-like node
    (lora and the structured linears): its only user a gelu (approximate none or tanh), then that value's only
    user an add (alpha 1) of a tensor with the same shape and dtype — either, both or neither."""
    activation, residual, folded, tail = "none", None, [], node
    u = _only_user(tail)
    if u is not None and u.op == "call_function" and u.target is aten.gelu.default and u.args[0] is tail:
        approx = u.kwargs.get("approximate", "none")
        if approx in ("none", "tanh"):
            activation = "gelu" if approx == "none" else "gelu_tanh"
            folded.append(u)
            tail = u
    u = _only_user(tail)
    if u is not None and u.op == "call_function" and u.target is aten.add.Tensor and len(u.args) == 2 \
            and u.kwargs.get("alpha", 1) == 1:
        other = u.args[1] if u.args[0] is tail else u.args[0]
        vt, vo = _val(tail), _val(other)
        if other is not tail and vt is not None and vo is not None and vo.shape == vt.shape \
                and vo.dtype == vt.dtype:
            residual = other
            folded.append(u)
            tail = u
    return activation, residual, folded, tail


def _lower_with_epilogue(gm, node, twin, args: tuple, kernel: str, result, fuse_epilogue: bool) -> None:
    """Replace `node` (and the epilogue nodes after it, when fuse_epilogue) by twin(*args, activation, residual)."""
    activation, residual, folded, tail = _epilogue(node) if fuse_epilogue else ("none", None, [], node)
    new = insert_call(gm, tail, twin, tuple(args) + (activation, residual), pass_name=PASS,
                      rule=f"template:{kernel}", replaces=node)
    new.meta["val"] = tail.meta.get("val")
    tail.replace_all_uses_with(new)
    for n in reversed([node] + folded):
        gm.graph.erase_node(n)
    epi = ",".join(x for x in (activation if activation != "none" else "", "+residual" if residual else "") if x)
    result.sites.append({"site": node.name, "status": "rewritten", "kernel": kernel + (f"[{epi}]" if epi else ""),
                         "folded": [n.name for n in folded]})
    return new


def _lower_lora(gm, node, result, fuse_epilogue: bool = True) -> None:
    b = _bound(node)
    args = (b["x"], b["weight"], b["bias"], b["lora_a"], b["lora_b"], b["scale"], b["adapter_input"])
    return _lower_with_epilogue(gm, node, kops.LORA, args, "lora_linear", result, fuse_epilogue)


def _lower_structured(gm, node, twin, kernel: str, result, fuse_epilogue: bool = True) -> None:
    """A structured linear: its arguments in schema order (defaults filled in), then the folded epilogue."""
    args = tuple(_bound(node).values())
    return _lower_with_epilogue(gm, node, twin, args, kernel, result, fuse_epilogue)


def _lower_softmax(gm, node, result) -> None:
    b = _bound(node)
    new = insert_call(gm, node, kops.SOFTMAX, (b["x"], b["dim"]), pass_name=PASS, rule="template:two_pass_softmax",
                      replaces=node)
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    result.sites.append({"site": node.name, "status": "rewritten", "kernel": "two_pass_softmax"})
    return new


# rewrite:: op name -> (its rewrite_triton:: twin with the same schema, template module, kernel name for sites)
SAME_SIGNATURE = {
    "monarch_linear": (kops.MONARCH, monarch_t, "monarch_linear"),
    "blockdiag_linear": (kops.BLOCKDIAG, blockdiag_t, "blockdiag_linear"),
    "lowrank_linear": (kops.LOWRANK, blockdiag_t, "lowrank_linear"),
    "vq_logits": (kops.VQ_LOGITS, vq_t, "vq_logits"),
    "shiftadd_linear": (kops.SHIFTADD, shiftadd_t, "shiftadd_lut"),
    "softplus_attention": (kops.SOFTPLUS_ATTENTION, softplus_t, "softplus_attention"),
    "multi_lora_linear": (kops.MULTI_LORA, lora_batch_t, "lora_batch"),
}


# the SAME_SIGNATURE ops whose twins take the trailing (activation, residual) epilogue arguments
EPILOGUE_OPS = ("monarch_linear", "blockdiag_linear", "lowrank_linear")


def _same_signature_rules() -> dict:
    """{rewrite:: OpOverload: (twin, module, kernel)} for the ops of SAME_SIGNATURE defined in this process."""
    rules = {}
    for name, rule in SAME_SIGNATURE.items():
        packet = getattr(torch.ops.rewrite, name, None)
        if packet is not None:
            rules[packet.default] = rule
    return rules


def _lower_same(gm, node, twin, kernel: str, result) -> None:
    """Swap a rewrite:: node for its rewrite_triton:: twin, arguments unchanged (the template needs no folding)."""
    new = insert_call(gm, node, twin, tuple(node.args), pass_name=PASS, rule=f"template:{kernel}", replaces=node,
                      kwargs=dict(node.kwargs))
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    result.sites.append({"site": node.name, "status": "rewritten", "kernel": kernel})
    return new


def region_spec(region) -> dict:
    index = {n: j for j, n in enumerate(region.nodes)}
    inputs = {n: i for i, n in enumerate(region.inputs)}
    ops = []
    pointwise = region.nodes[:-1] if region.reduce else region.nodes
    for n in pointwise:
        rule = pointwise_rule(n)
        refs = []
        for a in n.args:
            if isinstance(a, fx.Node):
                refs.append(f"v{index[a]}" if a in index else f"i{inputs[a]}")
            else:
                refs.append(float(a))
        kw = {k: v for k, v in n.kwargs.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        ops.append({"rule": rule.name, "args": refs, "kw": kw})
    keepdim = False
    if region.reduce:
        b = _bound(region.sink)
        keepdim = bool(b.get("keepdim"))
    return {"ops": ops, "reduce": region.reduce, "keepdim": keepdim,
            "dtype": str(_val(region.sink).dtype).replace("torch.", "")}


def _lower_region(gm, region, result, dump_dir) -> None:
    spec = region_spec(region)
    text = json.dumps(spec, sort_keys=True)
    sink = region.sink
    new = insert_call(gm, sink, kops.REGION, (list(region.inputs), text), pass_name=PASS, rule="generated:region",
                      replaces=sink)
    new.meta["val"] = sink.meta.get("val")
    sink.replace_all_uses_with(new)
    for n in reversed(region.nodes):
        gm.graph.erase_node(n)
    first = _val(region.nodes[0]) if not region.reduce or len(region.nodes) > 1 else None
    ndim = max(first.dim() if first is not None else 1, 1)
    source = generate.kernel_source(spec, len(region.inputs), ndim)
    key = cache.kernel_key(source)
    if dump_dir is not None:
        cache.dump(dump_dir, f"region_{key}", source)
    ops_text = "+".join(o["rule"] for o in spec["ops"]) + (f"→{region.reduce}" if region.reduce else "")
    result.sites.append({"site": sink.name, "status": "rewritten", "kernel": f"region_{key}", "ops": ops_text,
                         "nodes": [n.name for n in region.nodes]})
    return new


def _float64_outputs(gm: fx.GraphModule, inputs: list) -> list:
    """The graph's outputs computed in float64 (a copy with float parameters and inputs widened)."""
    import copy
    g64 = copy.deepcopy(gm).double()
    ins = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    return run_graph(g64, ins)


def lower(gm: fx.GraphModule, inputs: list, report, *, dump_dir=None, min_region_ops: int = 2,
          fuse_epilogue: bool = True, regions: bool = True) -> PassResult:
    """Lower `gm` in place; append (and return) the "codegen" PassResult on `report`.

    min_region_ops: smallest generated region worth a kernel; fuse_epilogue: fold GELU / residual add into the
    LoRA and structured-linear templates; regions: generate kernels for pointwise regions at all."""
    result = PassResult(name=PASS, spec="codegen{backend=triton}", contract="exact")
    start = time.perf_counter()
    verify = getattr(report, "verified", False)
    before = run_graph(gm, inputs) if verify else None
    truth = _float64_outputs(gm, inputs) if verify else None
    note = backend_note()
    if note:
        result.messages.append(note)
    propagate_shapes(gm, inputs)
    nodes_before = set(gm.graph.nodes)
    result.params_before = result.params_after = cost.program_params(gm)   # kernels move no parameters
    result.flops_before = result.flops_after = cost.program_flops(gm)      # and do the same arithmetic
    lora_op = torch.ops.rewrite.lora_linear.default
    softmax_pkt = getattr(torch.ops.rewrite, "two_pass_softmax", None)
    softmax_op = getattr(softmax_pkt, "default", None) if softmax_pkt is not None else None
    same = _same_signature_rules()
    used = set()
    site_nodes: dict = {}         # site index -> the rewrite_triton:: node that lowering put there
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        first = len(result.sites)
        new = None
        if node.target is lora_op:
            new = _lower_lora(gm, node, result, fuse_epilogue)
            used.add("lora_linear")
        elif softmax_op is not None and node.target is softmax_op:
            new = _lower_softmax(gm, node, result)
            used.add("softmax")
        elif node.target in same:
            twin, module, kernel = same[node.target]
            if node.target._schema.name.split("::")[-1] in EPILOGUE_OPS:
                new = _lower_structured(gm, node, twin, kernel, result, fuse_epilogue)
            else:
                new = _lower_same(gm, node, twin, kernel, result)
            used.add(module.__name__.rsplit(".", 1)[1])
        for i in range(first, len(result.sites)):
            site_nodes[i] = new
    for region in (find_regions(gm, min_ops=min_region_ops) if regions else []):
        index = len(result.sites)
        site_nodes[index] = _lower_region(gm, region, result, dump_dir)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, inputs)
    if dump_dir is not None:
        templates = [("lora_linear", lora_t), ("softmax", softmax_t)] + \
            [(m.__name__.rsplit(".", 1)[1], m) for m in (monarch_t, blockdiag_t, vq_t, shiftadd_t, softplus_t,
                                                          lora_batch_t)]
        for name, module in templates:
            if name in used:
                cache.dump(dump_dir, f"template_{name}", inspect.getsource(module))
        if used & GEMM_TEMPLATES:
            cache.dump(dump_dir, "template_gemm", inspect.getsource(gemm_t))
    nodes_after = set(gm.graph.nodes)
    result.nodes_added = [NodeChange(n.name, str(n.target), "codegen") for n in gm.graph.nodes
                          if n not in nodes_before]
    result.nodes_removed = [NodeChange(n.name, str(n.target)) for n in nodes_before if n not in nodes_after]
    result.messages.append(f"codegen: lowered {len(result.sites)} node(s) to Triton kernels "
                           f"({sum(1 for s in result.sites if s['kernel'].startswith('region'))} generated)")
    keys = [_site_key(site_nodes.get(i)) for i in range(len(result.sites))]
    devices = {k[1] for k in keys if k is not None}
    if before is None and any(select.would_measure(d) for d in devices):
        with torch.no_grad():
            run_graph(gm, inputs)             # selection measures every site's candidates on its first call
    if before is not None:
        after = run_graph(gm, inputs)
        result.error_vs_previous = relative_error(before, after)
        result.tolerance = exact_tolerance(after)
        if not result.error_vs_previous <= result.tolerance:
            # two fp32 programs that sum in different orders can differ by more than either differs from the
            # truth: judge against float64 then — the kernels must be as accurate as eager, within 2×
            err_kernels, err_eager = relative_error(truth, after), relative_error(truth, before)
            result.messages.append(f"codegen: vs float64, kernels {err_kernels:.3g}, eager {err_eager:.3g}")
            if not err_kernels <= max(result.tolerance, 2 * err_eager):
                report.passes.append(result)
                raise VerificationError(f"codegen changed the outputs: relative error {result.error_vs_previous:.3g} "
                                        f"> {result.tolerance:.3g} (vs float64: kernels {err_kernels:.3g}, "
                                        f"eager {err_eager:.3g})")
    _report_selection(result, keys)
    result.seconds = time.perf_counter() - start
    report.passes.append(result)
    return result


GEMM_TEMPLATES = {"lora_linear", "monarch_linear", "blockdiag_linear", "vq_logits"}


def _site_key(node: fx.Node | None):
    """(op name, device, dtype, shape bucket) under which codegen.select decides for this lowered node, from its
    arguments' metadata (None when an argument has none, or there is no node). Device and dtype are those of the
    first tensor argument, as in codegen.ops._run."""
    if node is None or not hasattr(node.target, "_schema"):
        return None
    missing, tensors = [], []

    def value(a):
        if isinstance(a, fx.Node):
            v = _val(a)
            if v is None:
                missing.append(a)
            else:
                tensors.append(v)
            return v
        if isinstance(a, (list, tuple)):
            return [value(x) for x in a]
        return a
    args = tuple(value(a) for a in _bound(node).values())
    if missing or not tensors:
        return None
    name = node.target._schema.name.split("::")[-1]
    return name, tensors[0].device, tensors[0].dtype, kops.shape_bucket(name, args)


def _report_selection(result: PassResult, keys: list) -> None:
    """Each site's "impl": which implementation codegen.select runs there and by how much it beat the aten path
    (inserted right after "kernel" so the report's table shows it)."""
    for i, (site, key) in enumerate(zip(result.sites, keys)):
        impl = select.site_summary(key[0], key[1], key[2], key[3]) if key is not None else "unknown (no metadata)"
        ordered = {}
        for k, v in site.items():
            ordered[k] = v
            if k == "kernel":
                ordered["impl"] = impl
        result.sites[i] = ordered
