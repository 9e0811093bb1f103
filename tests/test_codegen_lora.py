"""Fused LoRA linear template (codegen/templates/lora_linear.py) vs its reference run in float64.

Runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1): tiny shapes, ≤ 4 programs per grid; or
compiled on the GPU that REWRITE_TEST_DEVICE names (`make test-gpu`). Inputs and float64 references are built on
the CPU; kernels get device copies (guarded()/on_device()) and results come back with .cpu().
Inputs and outputs sit in NaN-guarded buffers: out-of-bounds reads show up as NaN in the result, out-of-bounds
writes as a changed guard.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.runtime import mma_upcast
from codegen.templates import gemm
from codegen.templates import lora_linear as lora_t
from codegen.templates.gemm import Tiles
from codegen.testing import LaunchSpy, guard_intact, guarded, guarded_output, on_device

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=1e-1)}
SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 37])


def _ref64(x, w, b, a, bb, s, xa, act, res):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return lora_t.reference(d(x), d(w), d(b), d(a), d(bb), s, d(xa), act, d(res))


@settings(max_examples=20, deadline=None)
@given(rows=SIZES, k=SIZES, n=SIZES, r=st.sampled_from([1, 2, 4, 8, 17]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), has_bias=st.booleans(),
       has_xa=st.booleans(), act=st.sampled_from(["none", "gelu", "gelu_tanh"]), has_res=st.booleans(),
       strided=st.booleans(), small_blocks=st.booleans(),
       scale=st.floats(-4, 4), seed=st.integers(0, 2**16))
def test_lora_kernel_matches_float64(rows, k, n, r, dtype, has_bias, has_xa, act, has_res, strided, small_blocks,
                                     scale, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) / max(1, k) ** 0.25).to(dtype)  # noqa: E731
    x, w, a, bb = mk(rows, k), mk(n, k), mk(r, k), mk(n, r)
    b = mk(n) if has_bias else None
    xa = mk(rows, k) if has_xa else None
    res = mk(rows, n) if has_res else None
    gx, gw, ga, gbb = (guarded(t, strided=strided) for t in (x, w, a, bb))
    gb = guarded(b) if b is not None else None
    gxa = guarded(xa, strided=strided) if xa is not None else None
    gres = guarded(res, strided=strided) if res is not None else None
    out = guarded_output((rows, n), dtype, strided=strided)
    blocks = Tiles(16, 16, 16) if small_blocks else None
    lora_t.launch(gx, gw, gb, ga, gbb, scale, gxa, act, gres, blocks=blocks, out=out)
    want = _ref64(x, w, b, a, bb, scale, xa, act, res)
    assert guard_intact(out), "write outside the output"
    got = out.cpu()
    assert not torch.isnan(got).any(), "NaN leaked from a guard region: out-of-bounds read"
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_lora_kernel_multi_tile_and_3d_input():
    torch.manual_seed(0)
    x = torch.randn(2, 19, 40)
    w, b, a, bb = torch.randn(45, 40), torch.randn(45), torch.randn(5, 40), torch.randn(45, 5)
    y = lora_t.launch(*map(on_device, (x, w, b, a, bb)), 0.5,
                      blocks=Tiles(16, 16, 16)).cpu()   # 3×3 tiles, 3 K steps
    torch.testing.assert_close(y.double(), _ref64(x, w, b, a, bb, 0.5, None, "none", None), rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 19, 45)


def test_lora_adapter_path_is_really_used():
    # B ≠ 0: dropping the adapter term would change the result far beyond tolerance
    torch.manual_seed(1)
    x, w, a, bb = torch.randn(4, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    y = lora_t.launch(on_device(x), on_device(w), None, on_device(a), on_device(bb), 2.0).cpu()
    base = (x.double() @ w.double().t())
    assert (y.double() - base).abs().max() > 1.0
    torch.testing.assert_close(y.double(), _ref64(x, w, None, a, bb, 2.0, None, "none", None), rtol=1e-5, atol=1e-5)


def test_op_falls_back_for_float64():
    import codegen.ops as kops
    x, w, a, bb = (torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64),
                   torch.randn(2, 8, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    y = kops.LORA(*map(on_device, (x, w, None, a, bb)), 1.0, None, "gelu", None).cpu()
    torch.testing.assert_close(y, lora_t.reference(x, w, None, a, bb, 1.0, None, "gelu", None))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_gelu_epilogue_accuracy_on_wide_range(act):
    # erf/tanh are polynomials here (no libdevice): check them over a wide input range in one shot
    x = torch.linspace(-12, 12, 48).reshape(3, 16)
    eye = torch.eye(16)
    zero_a, zero_b = torch.zeros(1, 16), torch.zeros(16, 1)
    y = lora_t.launch(on_device(x), on_device(eye), None, on_device(zero_a), on_device(zero_b), 1.0,
                      activation=act).cpu()
    want = torch.nn.functional.gelu(x.double(), approximate="tanh" if act == "gelu_tanh" else "none")
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act,res,xa", [("none", False, False), ("gelu", True, True)])
def test_lowered_op_trains_like_the_reference(act, res, xa):
    import codegen.ops as kops
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(8, 16)
    b = torch.randn(8, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    bb = torch.randn(8, 4, requires_grad=True)
    xin = torch.randn(2, 3, 16, requires_grad=True) if xa else None
    r = torch.randn(2, 3, 8, requires_grad=True) if res else None
    leaves = [t for t in (x, b, a, bb, xin, r) if t is not None]
    g = torch.randn(2, 3, 8)
    # the kernel runs on the test device; .to() is differentiable, so the gradients land on the CPU leaves
    y = kops.LORA(*map(on_device, (x, w, b, a, bb)), 0.5, on_device(xin), act, on_device(r))
    got = torch.autograd.grad(y, leaves, on_device(g))
    want = torch.autograd.grad(lora_t.reference(x, w, b, a, bb, 0.5, xin, act, r), leaves, g)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_low_precision_rounds_only_the_scaled_adapter_activation(dtype, monkeypatch):
    """UPCAST = mma_upcast(dtype) in both GEMMs (h = s·x_a·Aᵀ, then the output); without it h is rounded to the
    input dtype before ·Bᵀ and nothing else is: an fp32 output buffer (the fp32 accumulator) matches that float64
    emulation far tighter than the unrounded one."""
    spy = LaunchSpy(gemm.block_gemm_kernel)
    monkeypatch.setattr(gemm, "block_gemm_kernel", spy)
    g = torch.Generator().manual_seed(9)
    mk = lambda fan_in, *s: (torch.randn(*s, generator=g) / fan_in ** 0.5).to(dtype)  # noqa: E731
    x, w, b, a, bb = mk(1, 16, 64), mk(64, 48, 64), mk(1, 48), mk(64, 8, 64), mk(1, 48, 8)
    out = guarded_output((16, 48), torch.float32)
    lora_t.launch(guarded(x), guarded(w), guarded(b), guarded(a), guarded(bb), 1.5,
                  blocks=Tiles(16, 16, 16), out=out)
    assert [c["UPCAST"] for c in spy.calls] == [mma_upcast(dtype)] * 2
    rnd = None if mma_upcast(dtype) else dtype

    def emulate(r):
        h = 1.5 * (x.double() @ a.double().t())
        h = h if r is None else h.to(r).double()
        return x.double() @ w.double().t() + b.double() + h @ bb.double().t()

    want, other = emulate(rnd), emulate(dtype if rnd is None else None)
    tight = 4e-6 * want.abs().max().item()
    assert (out.cpu().double() - want).abs().max().item() <= tight
    assert (other - want).abs().max().item() > 10 * tight


def test_every_selection_candidate_computes_the_op(monkeypatch):
    """codegen.select may run any of the op's candidates — each Triton tile configuration, cuBLAS + the Triton
    epilogue pass, the two aten paths — so each must give the reference's result (fp32: exact dots), epilogue
    included."""
    g = torch.Generator().manual_seed(4)
    x, w, b, a, bb, res = (torch.randn(*s, generator=g) for s in ((40, 72), (56, 72), (56,), (4, 72), (56, 4),
                                                                   (40, 56)))
    want = _ref64(x, w, b, a, bb, 0.5, None, "gelu", res)
    cands = lora_t.candidates(*map(on_device, (x, w, b, a, bb)), 0.5, None, "gelu", on_device(res))
    kinds = [c.kind for c in cands]
    assert kinds[0] == "triton" and kinds.count("aten") == 2 and "cublas+triton-epilogue" in [c.name for c in cands]
    assert len({c.name for c in cands}) == len(cands)
    for c in cands:
        torch.testing.assert_close(c.run().cpu().double(), want, rtol=1e-5, atol=1e-5, msg=c.name)
