"""Softplus attention template (codegen/templates/softplus_attention.py) and rewrite_triton::softplus_attention
vs rewrite::softplus_attention's reference run in float64 (interpreter, grids of ≤ 4 programs).
Kernels run on codegen.testing.kernel_device() (the interpreter on CPU by default); inputs and float64 references
are built on the CPU, results come back with .cpu()."""
import math

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import codegen  # noqa: F401  (registers rewrite_triton::)
from codegen.templates import softplus_attention as sp_t
from codegen.runtime import mma_upcast
from codegen.testing import LaunchSpy, guard_intact, guarded, guarded_output, kernel_device, on_device
from rewriter.ops import softplus_attention as sp_op

TRITON_OP = torch.ops.rewrite_triton.softplus_attention.default
SIZES = [1, 2, 3, 5, 7, 13, 16, 17, 31, 47, 61, 64]
DIMS = [1, 2, 3, 5, 8, 16, 17, 31, 64]
LEADS = [(1,), (2,), (3,), (4,), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float16: dict(rtol=1e-2, atol=2e-3)}
DEV = kernel_device()
cpu_only = pytest.mark.skipif(DEV.type != "cpu", reason="runs fallbacks / autograd / lowering on CPU tensors")


def _blocks(bm, bn, d, dv):
    p2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731
    return dict(BM=bm, BN=bn, BD=p2(d), BDV=p2(dv))


def _mask(kind, lead, tq, tk, g):
    """A bool "may attend" mask in one of the shapes the softplus-attn pass produces (or None)."""
    if kind == "none":
        return None
    if kind == "padding":               # (B, 1, 1, Tk) or (1, Tk): the last third of the keys switched off
        shape = (lead[0], 1, 1, tk) if len(lead) == 2 else (1, tk)
        keep = torch.ones(shape, dtype=torch.bool)
        if tk > 1:
            keep[..., tk - tk // 3:] = False
        return keep
    keep = torch.rand(tq, tk, generator=g) < 0.6  # "random": any pattern, rows with no visible key included
    if tq > 1:
        keep[tq // 2] = False
    return keep


@settings(max_examples=20, deadline=None)
@given(tq=st.sampled_from(SIZES), tk=st.sampled_from(SIZES), d=st.sampled_from(DIMS), dv=st.sampled_from(DIMS),
       lead_i=st.integers(0, len(LEADS) - 1), bm=st.sampled_from([16, 32]), bn=st.sampled_from([16, 32]),
       causal=st.booleans(), mask=st.sampled_from(["none", "none", "padding", "random"]),
       reweight=st.booleans(), p=st.sampled_from([1.0, 3.0, 15.0]), train_len=st.sampled_from([0, 0, 4]),
       dtype=st.sampled_from([torch.float32, torch.float16]), kv_bcast=st.booleans(), strided=st.booleans(),
       zero_rows=st.booleans(), head=st.sampled_from(["none", "shared", "per-head"]), seed=st.integers(0, 2**16))
def test_kernel_matches_reference_in_float64(tq, tk, d, dv, lead_i, bm, bn, causal, mask, reweight, p, train_len,
                                             dtype, kv_bcast, strided, zero_rows, head, seed):
    fits = [lead for lead in LEADS if math.prod(lead) * triton.cdiv(tq, bm) <= 4]   # ≤ 4 programs
    lead = fits[lead_i % len(fits)]
    g = torch.Generator().manual_seed(seed)
    kv_lead = (lead[0], 1) if kv_bcast and len(lead) == 2 else lead     # k/v shared by all heads (broadcast)
    q = (torch.randn(*lead, tq, d, generator=g) * 3).to(dtype)
    k = (torch.randn(*kv_lead, tk, d, generator=g) * 3).to(dtype)
    v = torch.randn(*kv_lead, tk, dv, generator=g).to(dtype)
    if zero_rows:                       # all-zero q/k rows: F.normalize's max(‖x‖, eps) keeps them finite
        q[..., tq // 2, :] = 0
        k[..., (tk - 1) // 2, :] = 0
    keep = _mask(mask, lead, tq, tk, g)
    args = (causal, reweight, p, train_len, 1e-6)
    heads = {"none": 0, "shared": 1, "per-head": lead[-1] if len(lead) == 2 else 1}[head]
    gain = torch.rand(heads, generator=g) * 3 + 0.1 if heads else None       # a fitted gain and bias per head
    bias = torch.randn(heads, generator=g) * 3 if heads else None
    assert sp_t.supported(q, k, v, keep, gain, bias) is None
    out = guarded_output((*lead, tq, dv), dtype, strided=strided)
    gq, gk, gv = (guarded(t, strided=strided) for t in (q, k, v))
    got = sp_t.launch(gq, gk, gv, on_device(keep), *args, on_device(gain), on_device(bias),
                      blocks=_blocks(bm, bn, d, dv), out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (*lead, tq, dv)
    assert not torch.isnan(out).any(), "NaN leaked from a guard region: out-of-bounds read"
    assert guard_intact(out), "write outside the output"
    want = sp_op.reference(q.double(), k.double(), v.double(), keep, *args, gain, bias)
    tol = TOL[dtype] if not (reweight and dtype == torch.float32) else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(out.cpu().double(), want, **tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("reweight", [False, True])
def test_op_matches_rewrite_op_with_default_blocks(causal, reweight):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 37, 24, generator=g) for _ in range(3))   # default blocks: 2 query blocks
    keep = torch.ones(1, 1, 1, 37, dtype=torch.bool)
    keep[..., 30:] = False
    args = (keep, causal, reweight, 15.0, 0, 1e-6)
    got = TRITON_OP(*map(on_device, (q, k, v, keep)), *args[1:]).cpu()
    want = sp_op.OP(q, k, v, *args)
    assert got.shape == want.shape == (1, 2, 37, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-4 if reweight else 2e-5, atol=2e-5 if reweight else 2e-6)


def test_masked_rows_and_rows_beyond_train_len():
    q, k, v = (torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    keep = torch.ones(20, 20, dtype=torch.bool)
    keep[4] = False                      # a row that sees nothing: weights 0 (eps guards 0/0), output 0
    out = sp_t.launch(*map(on_device, (q, k, v, keep)), True, True, 3.0, 8, 1e-6, blocks=_blocks(16, 16, 16, 16))
    out = out.cpu()
    assert torch.equal(out[:, 4], torch.zeros(3, 16))
    # train_len = 8: rows that see ≤ 8 keys keep their LSSA weights, later rows are re-weighted
    lssa = sp_op.reference(q.double(), k.double(), v.double(), keep, True, False, 3.0, 0, 1e-6)
    lssar = sp_op.reference(q.double(), k.double(), v.double(), keep, True, True, 3.0, 0, 1e-6)
    torch.testing.assert_close(out[:, :8].double(), lssa[:, :8], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out[:, 9:].double(), lssar[:, 9:], rtol=2e-4, atol=2e-5)
    assert (lssa[:, 9:] - lssar[:, 9:]).abs().max() > 1e-2   # the two branches really differ there


@cpu_only
def test_supported_reasons_and_fallback_for_float64():
    q = torch.randn(2, 5, 8)
    assert sp_t.supported(q.double(), q.double(), q.double(), None) is not None
    assert sp_t.supported(q[0], q[0], q[0], None) is not None          # 2-D: no (H, T, d) layout
    assert sp_t.supported(q, q.half(), q, None) is not None            # mixed dtypes
    assert sp_t.supported(q, q, q, None, torch.ones(3)) is not None     # a gain for 3 heads, q has 2
    assert sp_t.supported(q, q, q, None, torch.ones(2), torch.zeros(1)) is None
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    args = (None, True, True, 3.0, 0, 1e-6)
    torch.testing.assert_close(TRITON_OP(x, x, x, *args), sp_op.reference(x, x, x, *args), rtol=0, atol=0)


@cpu_only
def test_gradients_match_the_rewrite_op():
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(1, 2, 11, 16, generator=g) for _ in range(3)]
    keep = torch.rand(11, 11, generator=g) < 0.7
    grad = torch.randn(1, 2, 11, 16, generator=g)
    head = [torch.tensor([0.7, 2.0]), torch.tensor([-1.0, 0.5])]           # gain, bias: trained by heal
    results = []
    for op in (TRITON_OP, sp_op.OP):
        q, k, v, gain, bias = (t.clone().requires_grad_() for t in base + head)
        out = op(q, k, v, keep, True, True, 3.0, 0, 1e-6, gain, bias)
        results.append((out, *torch.autograd.grad(out, [q, k, v, gain, bias], grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
    assert all(t.abs().sum() > 0 for t in results[0][1:])


@cpu_only
def test_lowering_puts_the_kernel_in_the_program():
    from rewriter import rewrite

    class Attn(torch.nn.Module):
        def forward(self, x):
            q, k, v = x, x * 0.5, x.flip(-1)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    x = torch.randn(1, 2, 9, 16)
    for spec in ("softplus-attn{calibrate=0}", "softplus-attn"):      # the paper's LSSA; a fitted gain and bias
        r = rewrite(Attn().eval(), (x,), passes=spec, codegen="triton", verify=True)
        module = r.module()
        targets = [str(n.target) for n in module.graph.nodes if n.op == "call_function"]
        assert "rewrite_triton.softplus_attention.default" in targets
        assert "rewrite.softplus_attention.default" not in targets
        head = {name.rsplit("_", 1)[1]: t.detach().double() for name, t in module.named_parameters()
                if "softplus_attn" in name}
        assert sorted(head) == ([] if spec.endswith("=0}") else ["bias", "gain"])
        assert all(t.shape == (2,) for t in head.values())                     # one per head
        want = sp_op.reference(x.double(), (x * 0.5).double(), x.flip(-1).double(), None, True, False, 15.0, 0,
                               1e-6, head.get("gain"), head.get("bias"))
        torch.testing.assert_close(module(x).double(), want, rtol=2e-5, atol=2e-6)



def _emulated(q, k, v, reweight, p, eps, rnd):
    """The kernel's arithmetic in float64 (causal): the unnormalised weights a (and r) rounded to `rnd` (None: not
    rounded) only where they meet v; the row sums, maxima and re-weighting use the unrounded values."""
    rounded = (lambda t: t) if rnd is None else (lambda t: t.to(rnd).double())  # noqa: E731
    q, k, v = q.double(), k.double(), v.double()
    s = torch.nn.functional.normalize(q, dim=-1, eps=eps) @ torch.nn.functional.normalize(k, dim=-1, eps=eps).mT
    keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    n = keep.sum(-1, keepdim=True).double()
    a = torch.nn.functional.softplus(math.log(q.shape[-1]) * torch.log(n) * s) * keep
    total = a.sum(-1, keepdim=True)
    out = rounded(a) @ v / (total + eps)
    if reweight:
        r = torch.relu(a / (total + eps) * n - (n > 1).double())
        r = (r / (r.amax(-1, keepdim=True) + eps)) ** p
        r_sum = r.sum(-1, keepdim=True)
        out = torch.where(r_sum > 0, rounded(r) @ v / (r_sum + eps), out)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reweight", [False, True])
def test_low_precision_dots_round_only_the_weights(dtype, reweight, monkeypatch):
    """fp16 (and bf16 on a GPU) q, k, v reach tl.dot unconverted (UPCAST = mma_upcast(dtype) = False); the only
    rounded intermediate is the weights a (r) cast to the input dtype for ·V — the scores use the raw q·kᵀ, so no
    normalised row is rounded. bf16 under the interpreter is upcast: nothing rounded. An fp32 output buffer exposes
    the fp32 accumulators: they must match the float64 emulation that rounds exactly there, far tighter than the
    other choice (and than rounding q̂, k̂ too, which moves the scores by ~|scale|·2⁻¹¹)."""
    g = torch.Generator().manual_seed(11)
    q, k = ((torch.randn(1, 2, 32, 16, generator=g) * 3).to(dtype) for _ in range(2))
    v = torch.randn(1, 2, 32, 16, generator=g).to(dtype)
    spy = LaunchSpy(sp_t.softplus_attention_kernel)
    monkeypatch.setattr(sp_t, "softplus_attention_kernel", spy)
    out = guarded_output((1, 2, 32, 16), torch.float32)
    sp_t.launch(guarded(q), guarded(k), guarded(v), None, True, reweight, 3.0, 0, 1e-6, out=out)
    assert [c["UPCAST"] for c in spy.calls] == [mma_upcast(dtype)]
    rnd = None if mma_upcast(dtype) else dtype
    got = out.cpu().double()
    want = _emulated(q, k, v, reweight, 3.0, 1e-6, rnd)
    other = _emulated(q, k, v, reweight, 3.0, 1e-6, dtype if rnd is None else None)
    tight = 4e-6 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tight
    assert (other - want).abs().max().item() > 10 * tight


def test_gpu_tiles_fit_the_shared_memory_budget_for_every_head_dim(monkeypatch):
    """On a GPU the K/V tile shrinks so that 3 pipeline stages of K and V fit SHARED_BUDGET (fp32 d = 128 at BN = 64
    needs 176 KiB, over an A100's 163 KiB: compile_check measured it); small head dims keep BN = 64."""
    monkeypatch.setattr(sp_t, "interpreter", lambda: False)
    for d, operand_bytes, bn in ((64, 2, 64), (128, 2, 64), (256, 2, 32), (64, 4, 64), (128, 4, 32), (256, 4, 16)):
        blocks = sp_t.pick_blocks(1024, 1024, d, d, operand_bytes)
        assert blocks["BN"] == bn and blocks["BD"] == blocks["BDV"] == d, (d, operand_bytes, blocks)
        assert 3 * bn * 2 * d * operand_bytes <= sp_t.SHARED_BUDGET
    assert sp_t.pick_blocks(1024, 8, 64, 64, 2)["BN"] == 16           # short key sequences: smallest tile
