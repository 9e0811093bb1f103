"""ShiftAdd LUT GEMV/GEMM template (codegen/templates/shiftadd_linear.py) vs rewrite::shiftadd_linear's reference
(dequantise + matmul) in float64, under the Triton interpreter or on the GPU REWRITE_TEST_DEVICE names (inputs and
references on the CPU, kernels on device copies) — the pow2 code (per-plane exponents) and the affine code (shared
exponents (1, 1, q, 1), per-group scales and offsets); plus the shiftadd pass lowered end to end."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import codegen.ops as kops
from codegen.templates import shiftadd_linear as sa_t
from codegen.testing import guard_intact, guarded, guarded_output, on_device, program_on_device
from rewriter import bcq
from rewriter.ops import shiftadd_linear as sa_op

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=4e-2)}
SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 37])


def _d(t):
    return None if t is None else t.double()


def _packed(g, out_f, in_f, q, group, terms):
    groups = bcq.padded_in(in_f, group) // group
    signs = torch.randint(0, 256, (q, out_f, groups * group // 8), generator=g, dtype=torch.uint8)
    exps = torch.randint(-7, 2, (out_f, groups, q, terms), generator=g, dtype=torch.int8)
    exps[torch.rand(exps.shape, generator=g) < 0.2] = bcq.ZERO_EXP
    return signs, exps


@settings(max_examples=20, deadline=None)
@given(rows=SIZES, in_f=SIZES, out_f=SIZES, q=st.sampled_from([1, 2, 3]), group=st.sampled_from([8, 16, 24, 32]),
       terms=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.float16]), has_bias=st.booleans(),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_lut_kernel_matches_float64(rows, in_f, out_f, q, group, terms, dtype, has_bias, strided, seed):
    g = torch.Generator().manual_seed(seed)
    signs, exps = _packed(g, out_f, in_f, q, group, terms)
    x = (torch.randn(rows, in_f, generator=g) / in_f ** 0.5).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype) if has_bias else None
    _check_against_float64(x, signs, exps, bias, in_f, group, strided)


def _check_against_float64(x, signs, exps, bias, in_f, group, strided, scales=None, offsets=None, blocks=None):
    """The kernel on guarded (out-of-bounds-detecting) buffers against the float64 reference."""
    out = guarded_output((x.shape[0], signs.shape[1]), x.dtype, strided=strided)
    sa_t.launch(guarded(x, strided), on_device(signs), on_device(exps), guarded(bias) if bias is not None else None,
                in_f, group, guarded(scales, strided) if scales is not None else None,
                guarded(offsets, strided) if offsets is not None else None, blocks=blocks, out=out)
    want = sa_op.reference(_d(x), signs, exps, _d(bias), in_f, group, scales, offsets)
    assert guard_intact(out), "write outside the output"
    got = out.cpu()
    assert not torch.isnan(got).any(), "NaN leaked from a guard region: out-of-bounds read"
    torch.testing.assert_close(got.double(), want, **TOL[x.dtype])


def test_lut_kernel_on_quantised_weights_and_strided_packing():
    # real BCQ output (3 planes, compensation-free) and non-contiguous packed tensors (every other byte / row)
    torch.manual_seed(0)
    w = torch.randn(24, 50)
    qw = bcq.quantize(w, bits=3, group=16, rounds=1)
    # (the strided views are cut from device buffers: .to() would make them contiguous)
    signs = on_device(torch.zeros(qw.signs.shape[0], qw.signs.shape[1], 2 * qw.signs.shape[2],
                                  dtype=torch.uint8))[..., ::2]
    signs.copy_(qw.signs)
    exps = on_device(torch.zeros(2 * qw.exponents.shape[0], *qw.exponents.shape[1:], dtype=torch.int8))[::2]
    exps.copy_(qw.exponents)
    assert not signs.is_contiguous() and not exps.is_contiguous()
    x = torch.randn(2, 3, 50)
    y = sa_t.launch(on_device(x), signs, exps, None, 50, 16).cpu()
    assert y.shape == (2, 3, 24)
    want = x.double() @ qw.dequantize().double().t()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert (y.double() - x.double() @ w.double().t()).abs().max() > 1e-3   # it is the quantised weight, not W


def test_zero_exponent_means_zero_and_op_gradient():
    g = torch.Generator().manual_seed(3)
    signs, exps = _packed(g, 8, 16, 2, 16, 1)
    exps[:, :, 1] = bcq.ZERO_EXP                         # plane 1 contributes nothing
    x = torch.randn(3, 16, requires_grad=True)
    y = kops.SHIFTADD(on_device(x), on_device(signs), on_device(exps), None, 16, 16)
    only0 = sa_op.reference(x.detach(), signs[:1], exps[:, :, :1], None, 16, 16)
    torch.testing.assert_close(y.detach().cpu(), only0, rtol=1e-5, atol=1e-5)
    go = torch.randn(3, 8)
    (gx,) = torch.autograd.grad(y, [x], on_device(go))       # .to() is differentiable: gx is on the CPU leaf
    torch.testing.assert_close(gx, go @ bcq.dequantize(signs, exps, 16, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("code", ["affine", "pow2"])
def test_shiftadd_pass_lowers_end_to_end(code):
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    base = rewrite(model, args, passes=f"shiftadd{{code={code},bits=3,group=32}}")    # quantisation on the CPU
    program, args = program_on_device(base.program), tuple(on_device(a) for a in args)
    r = rewrite(program, args, codegen="triton", verify=True)
    res = r.report.passes[-1]
    assert res.name == "codegen" and res.error_vs_previous is not None
    assert [s["kernel"] for s in res.sites].count("shiftadd_lut") == 12
    nodes = [n for n in r.program.graph.nodes if n.op == "call_function"]
    targets = [str(n.target) for n in nodes]
    assert targets.count("rewrite_triton.shiftadd_linear.default") == 12
    assert "rewrite.shiftadd_linear.default" not in targets
    # the affine code's scales and offsets are carried over (8 arguments); pow2 programs keep the 6-argument form
    assert {len(n.args) for n in nodes if "shiftadd" in str(n.target)} == {8 if code == "affine" else 6}
    want = program.module()(*args)
    torch.testing.assert_close(r.module()(*args), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("code", ["affine", "pow2"])
def test_shiftadd_pass_lowered_few_rows_run_the_lut_kernel(code, monkeypatch):
    """tiny-gpt's 32 rows take the dequantised GEMM; a small MLP at 3 rows (in_features 40: a padded group)
    runs the LUT kernel at both sites, with the affine code's scales and offsets."""
    from rewriter import rewrite
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.GELU(), torch.nn.Linear(24, 8)).eval()
    args = (torch.randn(3, 40),)
    base = rewrite(model, args, passes=f"shiftadd{{code={code},bits=3,group=16}}")
    program, args = program_on_device(base.program), tuple(on_device(a) for a in args)
    launched = []
    real_launch = sa_t.launch
    monkeypatch.setattr(sa_t, "launch", lambda *a, **k: launched.append(a[6] is not None) or real_launch(*a, **k))
    r = rewrite(program, args, codegen="triton", verify=True)
    res = r.report.passes[-1]
    assert [s["kernel"] for s in res.sites] == ["shiftadd_lut"] * 2 and res.error_vs_previous is not None
    assert launched == [code == "affine"] * 2, launched          # one verification run: both sites, with scales
    want = program.module()(*args)
    torch.testing.assert_close(r.module()(*args), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_many_rows_take_the_dequantised_gemm_few_rows_the_lut(monkeypatch):
    """Every row re-reads the signs: past LUT_ROWS_MAX rows the op runs dequantise + one GEMM (no notice: by
    design); up to it, the LUT kernel. Both give the quantised layer's output."""
    layer_4096 = torch.empty(3, 4096, 512, dtype=torch.uint8, device="meta")    # 4096 → 4096, 3 bits
    assert sa_t.lut_pays_off(16, layer_4096) and not sa_t.lut_pays_off(512, layer_4096)
    g = torch.Generator().manual_seed(5)
    signs, exps = _packed(g, 8, 32, 2, 16, 1)
    launched = []
    real_launch = sa_t.launch
    monkeypatch.setattr(sa_t, "launch", lambda *a, **k: launched.append(a[0].shape) or real_launch(*a, **k))
    monkeypatch.setattr(sa_t, "LUT_ROWS_MAX", 3)
    want = lambda x: x.double() @ bcq.dequantize(signs, exps, 32, 16).double().t()  # noqa: E731
    for rows, lut in ((3, True), (4, False)):
        x = torch.randn(rows, 32, generator=g)
        y = kops.SHIFTADD(on_device(x), on_device(signs), on_device(exps), None, 32, 16).cpu()
        torch.testing.assert_close(y.double(), want(x), rtol=1e-5, atol=1e-5)
        assert bool(launched) == lut, (rows, launched)
        launched.clear()


# ---- the affine code: shared exponents (1, 1, q, 1), per-group scales s and offsets β -------------------------------
def _affine(g, out_f, in_f, q, group):
    """Random affine-code tensors: packed signs, the shared exponents, fp16 scales and offsets (out, G)."""
    groups = bcq.padded_in(in_f, group) // group
    signs = torch.randint(0, 256, (q, out_f, groups * group // 8), generator=g, dtype=torch.uint8)
    scales = ((torch.rand(out_f, groups, generator=g) + 0.5) / 2 ** q).half()
    offsets = (torch.randn(out_f, groups, generator=g) * 0.1).half()
    return signs, bcq.affine_exponents(q), scales, offsets


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=12, deadline=None)
@given(rows=st.sampled_from([1, 2, 3, 7, 16]), in_f=SIZES, out_f=SIZES, q=st.sampled_from([1, 2, 3, 4]),
       group=st.sampled_from([8, 16, 24, 32, 64]), dtype=DTYPES, has_bias=st.booleans(),
       parts=st.sampled_from(["scales+offsets", "scales", "offsets"]), split=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lut_kernel_affine_code_matches_float64(rows, in_f, out_f, q, group, dtype, has_bias, parts, split, strided,
                                                seed):
    g = torch.Generator().manual_seed(seed)
    signs, exps, scales, offsets = _affine(g, out_f, in_f, q, group)
    scales = scales if "scales" in parts else None
    offsets = offsets if "offsets" in parts else None
    x = (torch.randn(rows, in_f, generator=g) / in_f ** 0.5).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype) if has_bias else None
    blocks = sa_t.pick_blocks(rows, out_f, signs.shape[2] * 8 // group, group // 8, split=split)
    _check_against_float64(x, signs, exps, bias, in_f, group, strided, scales, offsets, blocks)


def test_lut_kernel_on_affine_quantised_weights():
    # real quantize_affine output (4 planes, 50 inputs: a padded last group), 3-d x, bias; fp32 and bf16 x
    torch.manual_seed(1)
    w = torch.randn(24, 50)
    qw = bcq.quantize_affine(w, bits=4, group=16)
    assert qw.exponents.shape == (1, 1, 4, 1) and qw.scales.shape == qw.offsets.shape == (24, 4)
    bias = torch.randn(24)
    x = torch.randn(2, 3, 50)
    want = x.double() @ qw.dequantize().double().t() + bias.double()
    packed = [on_device(t) for t in (qw.signs, qw.exponents)]
    for dtype in (torch.float32, torch.bfloat16):
        y = sa_t.launch(on_device(x.to(dtype)), *packed, on_device(bias.to(dtype)), 50, 16, on_device(qw.scales),
                        on_device(qw.offsets)).cpu()
        assert y.shape == (2, 3, 24) and y.dtype == dtype
        ref = sa_op.reference(x.to(dtype).double(), qw.signs, qw.exponents, bias.to(dtype).double(), 50, 16,
                              qw.scales, qw.offsets)
        torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=5e-2)
    assert (want - x.double() @ w.double().t()).abs().max() > 1e-3   # it is the quantised weight, not W


def test_affine_op_lut_rows_dequantised_rows_and_gradient(monkeypatch):
    """rewrite_triton::shiftadd_linear with scales and offsets (positional or keyword): the LUT kernel up to
    LUT_ROWS_MAX rows, the dequantised GEMM past it; both the quantised layer's output, and x's gradient."""
    torch.manual_seed(4)
    w = torch.randn(24, 40)
    qw = bcq.quantize_affine(w, bits=3, group=16)
    wq = qw.dequantize()
    bias = torch.randn(24)
    packed = [on_device(t) for t in (qw.signs, qw.exponents)]
    launched = []
    real_launch = sa_t.launch
    monkeypatch.setattr(sa_t, "launch", lambda *a, **k: launched.append(a[0].shape) or real_launch(*a, **k))
    for rows, lut in ((1, True), (sa_t.LUT_ROWS_MAX, True), (sa_t.LUT_ROWS_MAX + 1, False)):
        x = torch.randn(rows, 40, requires_grad=True)
        y = kops.SHIFTADD(on_device(x), *packed, on_device(bias), 40, 16, on_device(qw.scales),
                          offsets=on_device(qw.offsets))
        want = x.detach().double() @ wq.double().t() + bias.double()
        torch.testing.assert_close(y.detach().cpu().double(), want, rtol=1e-5, atol=1e-5)
        assert bool(launched) == lut, (rows, launched)
        launched.clear()
        go = torch.randn(rows, 24)
        (gx,) = torch.autograd.grad(y, [x], on_device(go))
        torch.testing.assert_close(gx, go @ wq, rtol=1e-5, atol=1e-5)


def test_pow2_calls_with_and_without_the_trailing_nones_agree_bit_for_bit():
    g = torch.Generator().manual_seed(6)
    signs, exps = _packed(g, 16, 40, 3, 16, 2)
    x = on_device(torch.randn(2, 40, generator=g))
    six = kops.SHIFTADD(x, on_device(signs), on_device(exps), None, 40, 16)
    eight = kops.SHIFTADD(x, on_device(signs), on_device(exps), None, 40, 16, None, None)
    assert torch.equal(six, eight)


def test_supported_checks_the_affine_layout():
    signs, exps, scales, offsets = _affine(torch.Generator().manual_seed(7), 8, 32, 2, 16)
    x = torch.randn(1, 32)
    assert sa_t.supported(x, signs, exps, None, 32, 16, scales, offsets) is None
    assert sa_t.supported(x, signs, exps.expand(8, 2, 2, 1), None, 32, 16, scales, None) is None
    assert sa_t.supported(x, signs, exps[:, :, :1], None, 32, 16) is None              # one plane scale for all
    assert "broadcast" in sa_t.supported(x, signs, bcq.affine_exponents(3), None, 32, 16)   # 3 planes, 2 stored
    assert "scales" in sa_t.supported(x, signs, exps, None, 32, 16, scales[:, :1], offsets)
    assert "offsets" in sa_t.supported(x, signs, exps, None, 32, 16, scales, offsets.to(torch.int32))
    assert "group" in sa_t.supported(x, signs, exps, None, 32, 12)
