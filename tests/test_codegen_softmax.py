"""Two-pass softmax template (codegen/templates/softmax.py) vs torch.softmax in float64 (interpreter, tiny; or
on the GPU REWRITE_TEST_DEVICE names: inputs and references on the CPU, kernels on device copies)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.templates import softmax as softmax_t
from codegen.testing import guard_intact, guarded, guarded_output, on_device

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-2, atol=1e-3),
       torch.bfloat16: dict(rtol=5e-2, atol=1e-2)}


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.sampled_from([1, 2, 3, 5, 7, 13, 17, 33, 61]), min_size=1, max_size=3),
       dim=st.integers(-3, 2), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       mode=st.sampled_from(["row", "looped16", "looped32"]), magnitude=st.sampled_from([1.0, 30.0, 300.0]),
       neg_inf=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_softmax_kernel_matches_float64(shape, dim, dtype, mode, magnitude, neg_inf, strided, seed):
    dim = dim % len(shape)
    rows = 1
    for i, s in enumerate(shape):
        rows *= 1 if i == dim else s
    if rows > 4:                       # keep grids ≤ 4 programs under the interpreter
        shape = [s if i == dim else 1 for i, s in enumerate(shape)]
        shape[(dim + 1) % len(shape)] = min(4, shape[(dim + 1) % len(shape)] * 4) if len(shape) > 1 else shape[0]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * magnitude).to(dtype)
    if neg_inf and shape[dim] > 1:      # masked positions (as causal masks make), never a whole row
        x.narrow(dim, 0, shape[dim] // 2).fill_(float("-inf"))
    gx = guarded(x, strided=strided)
    out = guarded_output(shape, dtype)
    looped = mode != "row"
    block = {"row": None, "looped16": 16, "looped32": 32}[mode]
    softmax_t.launch(gx, dim, block=block, looped=looped, out=out)
    want = torch.softmax(x.double(), dim)
    assert guard_intact(out), "write outside the output"
    got = out.cpu()
    assert not torch.isnan(got).any(), "NaN leaked from a guard region: out-of-bounds read"
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_no_overflow_without_max_pass():
    # exp(1000) overflows fp32; the (mantissa, exponent) sums never form it
    x = torch.tensor([[1000.0, 999.0, 998.0, -1000.0], [88.0, 89.0, 90.0, 91.0]])
    for looped in (False, True):
        y = softmax_t.launch(on_device(x), -1, block=2 if looped else None, looped=looped).cpu()
        torch.testing.assert_close(y.double(), torch.softmax(x.double(), -1), rtol=1e-6, atol=1e-7)


def test_all_masked_row_is_nan_like_torch_and_other_rows_unaffected():
    x = torch.randn(3, 20)
    x[1] = float("-inf")
    x[2, 5:] = float("-inf")            # chunks that are entirely −∞ in the looped kernel
    for looped in (False, True):
        y = softmax_t.launch(on_device(x), -1, block=4 if looped else None, looped=looped).cpu()
        assert torch.isnan(y[1]).all() and torch.isnan(torch.softmax(x, -1)[1]).all()
        torch.testing.assert_close(y[[0, 2]].double(), torch.softmax(x[[0, 2]].double(), -1), rtol=1e-5, atol=1e-7)


def test_op_falls_back_for_float64():
    import codegen.ops as kops
    x = torch.randn(3, 9, dtype=torch.float64)
    torch.testing.assert_close(kops.SOFTMAX(on_device(x), 0).cpu(), torch.softmax(x, 0))


def test_lowered_softmax_op_backward_matches_torch():
    import codegen.ops as kops
    x = torch.randn(3, 11, requires_grad=True)
    g = torch.randn(3, 11)
    (got,) = torch.autograd.grad(kops.SOFTMAX(on_device(x), 0), [x], on_device(g))   # grad lands on the CPU leaf
    (want,) = torch.autograd.grad(torch.softmax(x, 0), [x], g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_out_whose_rows_are_not_one_2d_view_still_receives_the_result():
    """softmax over a middle dim of a contiguous (2, 2, 2) output: its rows along dim 1 cannot be viewed as 2-D."""
    x = torch.randn(2, 2, 2)
    out = guarded_output((2, 2, 2), torch.float32)
    softmax_t.launch(guarded(x), 1, out=out)
    assert guard_intact(out)
    torch.testing.assert_close(out.cpu().double(), torch.softmax(x.double(), 1), rtol=1e-5, atol=1e-6)
