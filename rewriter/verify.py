"""Checks run after every pass: graph lint and output shapes always, numerics on example inputs with --verify.

Error measure (per output tensor, then the max over outputs): normwise relative error
    err = max|y − y_ref| / max(max|y_ref|, tiny)
which is what "max relative error" means everywhere in this package. It is robust to outputs near zero,
where elementwise relative error is meaningless.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from .errors import VerificationError

# Tolerance for "exact" passes: a few units of rounding of the output dtype, normwise.
EXACT_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def exact_tolerance(outputs, program: fx.GraphModule | None = None) -> float:
    """The tolerance of an exact pass: that of the least precise floating dtype among the outputs and, given the
    program, its floating weights — a bf16 model that returns fp32 (an upcast head) still computes in bf16, and
    an exact rewrite of it (a merged weight rounded once to bf16) moves the output by bf16 ulps."""
    dtypes = [t.dtype for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if program is not None:
        dtypes += list(weight_dtypes(program))
    return max((EXACT_TOLERANCE.get(d, 1e-5) for d in dtypes), default=1e-5)


def weight_dtypes(program: fx.GraphModule) -> set[torch.dtype]:
    """Floating dtypes of the parameters and buffers the graph reads (the dtypes it computes in)."""
    from .ir import get_attr_value
    found = set()
    for node in program.graph.nodes:
        if node.op == "get_attr":
            value = get_attr_value(program, node.target)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                found.add(value.dtype)
    return found


def model_dtype(program: fx.GraphModule) -> torch.dtype | None:
    """The dtype holding most of the program's floating parameters and buffers (None when it has none)."""
    sizes: dict[torch.dtype, int] = {}
    tensors = list(program.named_parameters(remove_duplicate=True)) + list(program.named_buffers(remove_duplicate=True))
    for _, t in tensors:
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return max(sizes, key=sizes.get) if sizes else None


def flat_inputs(args: tuple, kwargs: dict | None) -> list:
    """The flat list of user inputs, in the order of the unlifted module's placeholders."""
    return pytree.tree_leaves((tuple(args), dict(kwargs or {})))


def run_graph(gm: fx.GraphModule, inputs: list) -> list:
    """Run the graph on flat inputs (bypassing the pytree wrapper) and return flat outputs."""
    with torch.no_grad():
        out = fx.Interpreter(gm).run(*inputs)
    return pytree.tree_leaves(out)


def _double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.double()
    return value


class _Float64Interpreter(fx.Interpreter):
    """Runs a graph with every floating parameter and buffer read as float64.

    A weight is converted where an op reads it, not where the graph fetches it: an unlifted program fetches all
    its weights at the top, so converting there held a float64 copy of every weight at once (4 × a bf16 model —
    8.9 GB measured on a 1.1B-parameter checkpoint); converted per op, one copy lives while its op runs."""

    def call_function(self, target, args, kwargs):
        args, kwargs = pytree.tree_map(_double, (args, kwargs))
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        args, kwargs = pytree.tree_map(_double, (args, kwargs))
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        args, kwargs = pytree.tree_map(_double, (args, kwargs))
        return super().call_module(target, args, kwargs)


def run_graph_float64(gm: fx.GraphModule, inputs: list) -> list | None:
    """The graph's outputs with its floating weights and inputs in float64 — the function the program means,
    nearly free of rounding — or None when the graph does not run that way (an op without a float64 kernel, an
    explicit cast to a low-precision dtype feeding a matmul, ...)."""
    doubled = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    try:
        with torch.no_grad():
            out = _Float64Interpreter(gm).run(*doubled)
    except Exception:
        return None
    return pytree.tree_leaves(out)


def exact_agreement(previous: list, outputs: list, truth: list | None, tolerance: float) -> tuple[bool, float]:
    """Is `outputs` the same function as `previous` up to rounding? Returns (ok, error against previous).

    Fast path: normwise relative error ≤ tolerance. Where the function is ill-conditioned at the example inputs
    (cancellation: x·W and x·ΔW nearly opposite, so the previous program's own rounding error is large), two correct
    programs may disagree by more than that; then with the float64 `truth` the new program is accepted when it is
    no further from the truth than a few times the previous program is, plus the tolerance."""
    err = relative_error(previous, outputs)
    if err <= tolerance:
        return True, err
    if truth is None:
        return False, err
    e_new = relative_error(truth, outputs)
    e_old = relative_error(truth, previous)
    return e_new <= tolerance + 4.0 * e_old, err


def propagate_shapes(gm: fx.GraphModule, inputs: list) -> list:
    """FakeTensor propagation: refreshes node.meta['val'] everywhere; returns the fake outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    with torch.no_grad():
        out = FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    for node in gm.graph.nodes:  # get_attr nodes get a fake of their tensor too
        if node.op == "get_attr" and isinstance(node.meta.get("val"), torch.Tensor) \
                and not isinstance(node.meta["val"], torch._subclasses.FakeTensor):
            node.meta["val"] = mode.from_tensor(node.meta["val"])
    return pytree.tree_leaves(out)


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
    return repr(t)


def check_same_signature(expected: list, got: list, pass_label: str) -> None:
    """Outputs must keep their count, shapes and dtypes."""
    if len(expected) != len(got):
        raise VerificationError(f"{pass_label} changed the number of outputs from {len(expected)} to {len(got)}")
    for i, (a, b) in enumerate(zip(expected, got)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            raise VerificationError(f"{pass_label} changed output {i} from {describe(a)} to {describe(b)}")
        if isinstance(a, torch.Tensor) and (tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype):
            raise VerificationError(f"{pass_label} changed output {i} from {describe(a)} to {describe(b)}")


def relative_error(reference: list, got: list) -> float:
    """Max over outputs of max|got − ref| / max|ref| (computed in float64). NaN where ref is finite -> inf."""
    worst = 0.0
    for ref, out in zip(reference, got):
        if not (isinstance(ref, torch.Tensor) and ref.is_floating_point()):
            if isinstance(ref, torch.Tensor) and not torch.equal(ref, out):
                worst = max(worst, float("inf"))
            continue
        r, o = ref.detach().double(), out.detach().double()
        finite = torch.isfinite(r)
        if not torch.equal(finite, torch.isfinite(o)) or not torch.equal(r[~finite].nan_to_num(), o[~finite].nan_to_num()):
            return float("inf")
        if r.numel() == 0 or not finite.any():
            continue
        scale = r[finite].abs().max().clamp_min(1e-30)
        worst = max(worst, float((o[finite] - r[finite]).abs().max() / scale))
    return worst
