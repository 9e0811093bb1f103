"""Fused VQ-logits template (codegen/templates/vq_logits.py) vs rewrite::vq_logits' reference in float64, under
the Triton interpreter (NaN-guarded inputs, sentinel-guarded outputs); plus the vq-logits pass lowered end to end.
Kernels run on codegen.testing.kernel_device() (the interpreter on CPU by default); inputs and float64 references
are built on the CPU, results come back with .cpu()."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import codegen.ops as kops
from codegen.templates import gemm
from codegen.templates import vq_logits as vq_t
from codegen.templates.gemm import Tiles
from codegen.runtime import interpreter, mma_upcast
from codegen.testing import LaunchSpy, guard_intact, guarded, guarded_output, kernel_device, on_device
from rewriter.ops import vq_logits as vq_op

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-2)}
SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 37])
cpu_only = pytest.mark.skipif(kernel_device().type != "cpu", reason="runs the demo model / autograd on CPU tensors")


def _d(t):
    return None if t is None else t.double()


@settings(max_examples=20, deadline=None)
@given(rows=SIZES, d=SIZES, k=st.sampled_from([1, 2, 3, 7, 16, 17, 40]), vocab=st.sampled_from([1, 5, 29, 64, 97]),
       dtype=st.sampled_from([torch.float32, torch.float16]), has_bias=st.booleans(), log_softmax=st.booleans(),
       map_dtype=st.sampled_from([torch.int32, torch.int64]), strided=st.booleans(), small=st.booleans(),
       seed=st.integers(0, 2**16))
def test_vq_kernel_matches_float64(rows, d, k, vocab, dtype, has_bias, log_softmax, map_dtype, strided, small, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g).to(dtype)
    codebook = (torch.randn(k, d, generator=g) / d ** 0.5).to(dtype)
    code_map = torch.randint(0, k, (vocab,), generator=g).to(map_dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if has_bias else None
    out = guarded_output((rows, vocab), dtype, strided=strided)
    tiles = Tiles(16, 16, 16) if small else None
    gmap = code_map
    if strided:   # a non-contiguous map (stride 2) in a buffer of out-of-range codes: misaddressing reads garbage
        gmap = torch.full((2 * vocab + 6,), 10 ** 6, dtype=map_dtype, device=kernel_device())[3:3 + 2 * vocab:2]
        gmap.copy_(code_map)
    else:
        gmap = on_device(code_map)
    vq_t.launch(guarded(h, strided), guarded(codebook, strided), gmap, guarded(bias) if bias is not None else None,
                log_softmax, tiles=tiles, bv=16 if small else None, bm=2 if small else None, out=out)
    want = vq_op.reference(_d(h), _d(codebook), code_map, _d(bias), log_softmax)
    assert not torch.isnan(out).any(), "NaN leaked from a guard region: out-of-bounds read"
    assert guard_intact(out), "write outside the output"
    torch.testing.assert_close(out.cpu().double(), want, **TOL[dtype])


def test_vq_gather_uses_the_map_and_log_softmax_normalises():
    torch.manual_seed(0)
    h, codebook = torch.randn(4, 16), torch.randn(6, 16)
    code_map = torch.tensor([5, 0, 0, 3, 2, 2, 2, 1, 4, 5, 3])
    dh, dc, dm = on_device(h), on_device(codebook), on_device(code_map)
    y = vq_t.launch(dh, dc, dm).cpu()
    torch.testing.assert_close(y, (h @ codebook.t())[:, code_map], rtol=1e-5, atol=1e-5)
    lp = vq_t.launch(dh, dc, dm, log_softmax=True).cpu()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4), rtol=1e-5, atol=1e-5)
    lpb = vq_t.launch(dh, dc, dm, on_device(torch.randn(11)), log_softmax=True).cpu()
    torch.testing.assert_close(lpb.exp().sum(-1), torch.ones(4), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_operands_reach_the_dot_and_code_logits_round_to_the_input_dtype(dtype, monkeypatch):
    """UPCAST = mma_upcast(dtype): fp16 (everywhere) and bf16 on a GPU feed tl.dot unconverted, fp32 and bf16
    under the interpreter are upcast. The code logits are rounded to the input dtype (as the op's F.linear returns
    them) whatever the output dtype: an fp32 output buffer must match that rounding far tighter than the unrounded
    logits do."""
    assert mma_upcast(torch.float16) is False and mma_upcast(torch.float32) is True
    g = torch.Generator().manual_seed(5)
    h = torch.randn(16, 48, generator=g).to(dtype)
    codebook = (torch.randn(24, 48, generator=g) / 48 ** 0.5).to(dtype)
    code_map = torch.randint(0, 24, (40,), generator=g)
    spy = LaunchSpy(gemm.block_gemm_kernel)
    monkeypatch.setattr(gemm, "block_gemm_kernel", spy)
    out = guarded_output((16, 40), torch.float32)
    vq_t.launch(guarded(h), guarded(codebook), on_device(code_map), out=out)
    assert [c["UPCAST"] for c in spy.calls] == [mma_upcast(dtype)]
    logits = h.double() @ codebook.double().t()
    want = logits.to(dtype).double()[:, code_map]
    got = out.cpu().double()
    tight = 4e-6 * want.abs().max().item()   # fp32 accumulation: measured ≤ 1e-7·max
    if dtype == torch.bfloat16 and interpreter():   # the interpreter's fp32 → bf16 cast truncates: ≤ 1 ulp (2⁻⁷)
        assert ((got - want).abs() <= 2.0 ** -7 * want.abs() + 1e-30).all()
    else:
        assert (got - want).abs().max().item() <= tight
    if dtype != torch.float32:
        assert (logits[:, code_map] - want).abs().max().item() > 10 * tight   # the rounding is visible


@cpu_only
def test_vq_op_gradients_match_reference():
    torch.manual_seed(1)
    h = torch.randn(2, 3, 16, requires_grad=True)
    codebook = torch.randn(5, 16, requires_grad=True)
    bias = torch.randn(9, requires_grad=True)
    code_map = torch.randint(0, 5, (9,), dtype=torch.int32)
    go = torch.randn(2, 3, 9)
    for log_sm in (False, True):
        y = kops.VQ_LOGITS(h, codebook, code_map, bias, log_sm)
        want = vq_op.reference(h, codebook, code_map, bias, log_sm)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(y, [h, codebook, bias], go),
                        torch.autograd.grad(want, [h, codebook, bias], go)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@cpu_only
def test_vq_logits_pass_lowers_end_to_end():
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    base = rewrite(model, args, passes="vq-logits{codes=32}")
    r = rewrite(base.program, args, codegen="triton", verify=True)
    res = r.report.passes[-1]
    assert res.name == "codegen" and res.error_vs_previous is not None
    assert [s["kernel"] for s in res.sites].count("vq_logits") == 1
    targets = [str(n.target) for n in r.program.graph.nodes if n.op == "call_function"]
    assert "rewrite_triton.vq_logits.default" in targets and "rewrite.vq_logits.default" not in targets
    want = base.module()(*args)
    torch.testing.assert_close(r.module()(*args), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
