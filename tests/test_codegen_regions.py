"""Generated kernels for fused pointwise/reduction regions (codegen/regions.py, generate.py, pointwise_table.py).

Random programs over the op table are exported, lowered with `codegen.lower`, run through the interpreter (or on
the GPU REWRITE_TEST_DEVICE names: programs are exported and lowered on device copies of the inputs) and compared
with the original program run in float64 on the CPU.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

import codegen
import codegen.ops as kops
from codegen import generate
from codegen.regions import Region, check_acyclic, find_regions
from codegen.testing import guard_intact, guarded, guarded_output, on_device
from rewriter.pass_manager import Report

F = torch.nn.functional
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}

UNARY = {
    "neg": lambda v: -v,
    "exp": lambda v: torch.exp(torch.tanh(v)),          # tanh keeps exp's argument in range
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "log": lambda v: torch.log(torch.sigmoid(v)),
    "pow2": lambda v: v ** 2,
    "pow3": lambda v: torch.pow(v, 3),
    "scale": lambda v: v * 0.5 - 1.0,
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: torch.sub(a, b, alpha=2),
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (torch.sigmoid(b) + 1.0),
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}


class Program(torch.nn.Module):
    def __init__(self, steps, reduce, keepdim):
        super().__init__()
        self.steps, self.reduce, self.keepdim = steps, reduce, keepdim

    def forward(self, x, y, cond):
        vals = [x, y]
        for kind, name, i, j in self.steps:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if kind == "u":
                vals.append(UNARY[name](a))
            elif kind == "b":
                vals.append(BINARY[name](a, b))
            elif kind == "where":
                vals.append(torch.where(cond, a, b))
            else:
                vals.append(a.masked_fill(cond, -3.0))
        v = vals[-1] + vals[2] if len(vals) > 3 else vals[-1]
        if self.reduce == "sum":
            v = v.sum(-1, keepdim=self.keepdim)
        elif self.reduce == "max":
            v = v.amax(-1, keepdim=self.keepdim)
        elif self.reduce == "mean":
            v = v.mean(-1, keepdim=self.keepdim)
        return v


STEP = st.one_of(
    st.tuples(st.just("u"), st.sampled_from(sorted(UNARY)), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("b"), st.sampled_from(sorted(BINARY)), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.sampled_from(["where", "masked_fill"]), st.just(""), st.integers(0, 9), st.integers(0, 9)))


def _lower(module, inputs, min_ops=2):
    gm = torch.export.export(module, tuple(inputs)).module()
    report = Report()
    result = codegen.lower(gm, list(inputs), report, min_region_ops=min_ops)
    return gm, result


@settings(max_examples=20, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=6), reduce=st.sampled_from([None, "sum", "max", "mean"]),
       keepdim=st.booleans(), rows=st.sampled_from([1, 3, 5, 8]), cols=st.sampled_from([1, 2, 7, 16, 33, 130]),
       y_shape=st.sampled_from(["full", "row", "col", "3d"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_random_region_matches_float64(steps, reduce, keepdim, rows, cols, y_shape, dtype, strided, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, cols, generator=g).to(dtype)
    shape = {"full": (2, rows, cols), "row": (cols,), "col": (rows, 1), "3d": (2, 1, cols)}[y_shape]
    y = torch.randn(*shape, generator=g).to(dtype)
    cond = torch.randn(rows, cols, generator=g) > 0
    module = Program(steps, reduce, keepdim)
    inputs = [guarded(x, strided=strided), guarded(y, strided=strided), on_device(cond)]
    gm, result = _lower(module, inputs, min_ops=1)
    want = module(x.double(), y.double(), cond)
    got = gm(*inputs).cpu()
    assert any(n.target is kops.REGION for n in gm.graph.nodes), "nothing was lowered"
    assert result.sites and all(s["kernel"].startswith("region_") for s in result.sites)
    assert got.dtype == dtype and got.shape == want.shape
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("name", sorted(UNARY) + sorted(BINARY))
def test_each_table_op_alone(name):
    torch.manual_seed(0)
    x, y = torch.randn(3, 21) * 3, torch.randn(3, 21)
    fn = UNARY[name] if name in UNARY else BINARY[name]

    class M(torch.nn.Module):
        def forward(self, a, b):
            return fn(a) if name in UNARY else fn(a, b)
    dx, dy = on_device(x), on_device(y)
    gm, result = _lower(M(), [dx, dy], min_ops=1)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target not in (kops.REGION,)
                and "aten" in str(n.target) and "sym" not in str(n.target)], gm.code
    got = gm(dx, dy).cpu()
    want = M()(x.double(), y.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_regions_are_maximal_and_single_output():
    class M(torch.nn.Module):
        def forward(self, x, w):
            a = x * 2.0
            b = torch.tanh(a) + a          # diamond: a used twice inside the region
            c = torch.matmul(b, w)         # not a table op: splits regions
            d = torch.relu(c) * c
            return d.sum(-1), b
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    dx, dw = on_device(x), on_device(w)
    gm = torch.export.export(M(), (dx, dw)).module()
    from rewriter.verify import propagate_shapes
    propagate_shapes(gm, [dx, dw])
    regions = find_regions(gm)
    names = sorted(tuple(n.target.__name__ for n in r.nodes) for r in regions)
    # b is a graph output and feeds the matmul: {mul, tanh, add}; after the matmul {relu, mul, sum}
    assert len(regions) == 2, names
    assert sorted(len(r.nodes) for r in regions) == [3, 3]
    assert sum(r.reduce == "sum" for r in regions) == 1
    got = codegen.lower(gm, [dx, dw], Report())
    out = gm(dx, dw)
    want = M()(x.double(), w.double())
    for o, e in zip(out, want):
        torch.testing.assert_close(o.cpu().double(), e, rtol=1e-5, atol=1e-4)
    assert len(got.sites) == 2


def test_cycle_check_rejects_a_region_with_an_outside_path():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.relu.default, (x,))
    b = g.call_function(torch.ops.aten.sin.default, (a,))        # outside the "region"
    c = g.call_function(torch.ops.aten.add.Tensor, (a, b))
    g.output(c)
    gm = fx.GraphModule(torch.nn.Module(), g)
    with pytest.raises(RuntimeError, match="cycle"):
        check_acyclic(gm, [Region(c, [a, c], None, [x, b])])
    check_acyclic(gm, [Region(c, [b, c], None, [a])])   # a legal region passes


def test_generated_kernel_guards_and_broadcast():
    spec = {"ops": [{"rule": "mul", "args": ["i0", "i1"], "kw": {}}, {"rule": "gelu", "args": ["v0"], "kw": {}}],
            "reduce": None, "keepdim": False, "dtype": "float32"}
    x, b = torch.randn(3, 5, 19), torch.randn(5, 1)
    out = guarded_output((3, 5, 19), torch.float32)
    generate.launch([guarded(x, strided=True), guarded(b)], spec, out=out)
    assert guard_intact(out)
    got = out.cpu()
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), F.gelu(x.double() * b.double()), rtol=1e-5, atol=1e-6)


def test_guard_helper_detects_out_of_bounds_write():
    for out in (guarded(torch.zeros(4, 5)), guarded_output((4, 5), torch.float16, strided=True)):
        assert guard_intact(out)
        out.fill_(float("nan"))                 # writes inside the view are fine
        assert guard_intact(out)
        out._guard_base[-1] = float("nan") if not torch.isnan(out._guard_base[0]) else 1.0
        assert not guard_intact(out)


def test_region_op_backward_matches_aten():
    spec = {"ops": [{"rule": "mul", "args": ["i0", "i1"], "kw": {}}, {"rule": "tanh", "args": ["v0"], "kw": {}},
                    {"rule": "where", "args": ["i2", "v1", "i0"], "kw": {}}],
            "reduce": "sum", "keepdim": False, "dtype": "float32"}
    import json
    x = torch.randn(3, 7, requires_grad=True)
    w = torch.randn(7, requires_grad=True)
    cond = torch.randn(3, 7) > 0
    g = torch.randn(3)
    # the kernel runs on the test device; .to() is differentiable, so the gradients land on the CPU leaves
    y = kops.REGION([on_device(x), on_device(w), on_device(cond)], json.dumps(spec))
    got = torch.autograd.grad(y, [x, w], on_device(g))
    want = torch.autograd.grad(torch.where(cond, torch.tanh(x * w), x).sum(-1), [x, w], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
