"""Structured FFN passes: monarch, blockdiag, lowrank, structured — projections, ops, graph rewrites."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter  # noqa: F401
from rewriter import rewrite
from rewriter.errors import UserError
from rewriter.ops import blockdiag_linear, lowrank_linear, monarch_linear
from rewriter.projections import (Factored, blockdense_project, blockdiag_project, lowrank_project,
                                  monarch_project, monarch_sizes, output_error, top_svd, weight_error)

OPS = torch.ops.rewrite


def _random_monarch(m, n, b, gen, dtype=torch.float32):
    p, q, s = monarch_sizes(m, n, b)
    return Factored("monarch", m, n, {"w1": torch.randn(b, q, p, generator=gen, dtype=dtype),
                                      "w2": torch.randn(b, s, q, generator=gen, dtype=dtype)})


shapes = st.tuples(st.integers(4, 40), st.integers(4, 40), st.sampled_from([2, 3, 4]))


# ---- projections ---------------------------------------------------------------------------------------------
@settings(max_examples=15)
@given(shapes, st.integers(0, 2 ** 16))
def test_monarch_projection_recovers_monarch_matrix_and_is_idempotent(shape, seed):
    m, n, b = shape
    w = _random_monarch(m, n, b, torch.Generator().manual_seed(seed)).dense(torch.float32)
    fac = monarch_project(w, b)
    assert fac.factors["w1"].dtype == torch.float32
    approx = fac.dense(torch.float32)
    assert weight_error(w, approx) <= 1e-5
    again = monarch_project(approx, b).dense(torch.float32)
    assert weight_error(approx, again) <= 1e-5


@settings(max_examples=10)
@given(shapes, st.integers(0, 2 ** 16), st.floats(1e-3, 1e-1))
def test_monarch_projection_is_optimal_against_perturbed_factors(shape, seed, scale):
    m, n, b = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    fac = monarch_project(w, b)
    best = weight_error(w, fac.dense())
    assert best < 1.0
    for _ in range(5):
        moved = Factored("monarch", m, n, {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                                           for k, v in fac.factors.items()})
        assert best <= weight_error(w, moved.dense()) + 1e-12


def test_monarch_square_sqrt_case_is_rank_one_per_slice():
    n, b = 16, 4                                   # b = √n: every (output group, input block) slice has rank 1
    p, q, s = monarch_sizes(n, n, b)
    assert q // b == 1
    w = torch.randn(n, n, dtype=torch.float64)
    approx = monarch_project(w, b).dense()
    for c in range(b):
        for k in range(b):
            assert torch.linalg.matrix_rank(approx[c::b, k * p:(k + 1) * p]) <= 1


@settings(max_examples=15)
@given(st.integers(3, 30), st.integers(3, 30), st.integers(1, 10), st.integers(0, 2 ** 16))
def test_lowrank_error_is_the_svd_tail(m, n, rank, seed):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    fac = lowrank_project(w, rank=rank)
    r = fac.info["rank"]
    sv = torch.linalg.svdvals(w.double())
    tail = float(sv[r:].square().sum().sqrt() / sv.square().sum().sqrt())
    assert abs(weight_error(w, fac.dense()) - tail) <= 1e-5
    # √S split: both factors carry the same singular-value scale
    assert torch.allclose(fac.factors["u"].norm(dim=0), fac.factors["v"].norm(dim=1), rtol=1e-4)


@settings(max_examples=10)
@given(st.integers(8, 30), st.integers(8, 30), st.integers(0, 2 ** 16))
def test_blockdense_and_blockdiag_are_optimal(m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    for fac in (blockdense_project(w, 4, 8), blockdiag_project(w, 4)):
        best = weight_error(w, fac.dense())
        for _ in range(4):
            moved = Factored(fac.kind, m, n, {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                                              for k, v in fac.factors.items()})
            assert best <= weight_error(w, moved.dense()) + 1e-12
    # plain block-diagonal keeps exactly the diagonal blocks
    d = blockdiag_project(w, 4).dense()
    p, t = -(-n // 4), -(-m // 4)
    mask = torch.zeros(m, n, dtype=torch.bool)
    for k in range(4):
        mask[k * t:(k + 1) * t, k * p:(k + 1) * p] = True
    assert torch.equal(d[mask], w[mask]) and not d[~mask].any()


def test_top_svd_gram_path_matches_svd():
    a = torch.randn(2, 300, 280, dtype=torch.float64)
    left, right = top_svd(a, 20)
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    want = (u[..., :20] * sv[..., None, :20]) @ vh[..., :20, :]
    assert torch.allclose(left @ right, want, atol=1e-9)
    left, right = top_svd(a.transpose(1, 2), 20)
    assert torch.allclose(left @ right, want.transpose(1, 2), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_projected_in_fp32_and_cast_once(dtype):
    w = torch.randn(24, 32).to(dtype)
    for project in (lambda v: monarch_project(v, 4), lambda v: lowrank_project(v, rank=5),
                    lambda v: blockdense_project(v, 4, 8)):
        got, want = project(w), project(w.float())
        for k in got.factors:
            assert got.factors[k].dtype == dtype
            assert torch.equal(got.factors[k], want.factors[k].to(dtype))


def test_activation_weighted_lowrank_lowers_output_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=gen)
    x = torch.randn(400, 48, generator=gen) * torch.logspace(1, -2, 48)   # strongly anisotropic inputs
    plain = lowrank_project(w, rank=6)
    aware = lowrank_project(w, rank=6, activations=x)
    assert output_error(x, w, aware.dense(), None) < 0.5 * output_error(x, w, plain.dense(), None)
    assert weight_error(w, aware.dense()) >= weight_error(w, plain.dense()) - 1e-9


# ---- ops -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,b", [(12, 8, 2), (10, 14, 4), (9, 9, 3)])
def test_monarch_op_gradcheck_and_fake(m, n, b):
    gen = torch.Generator().manual_seed(0)
    fac = _random_monarch(m, n, b, gen, torch.float64)
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    w1, w2 = (fac.factors[k].clone().requires_grad_() for k in ("w1", "w2"))
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: OPS.monarch_linear(*a, m), (x, w1, w2, bias))
    y = OPS.monarch_linear(x, w1, w2, bias, m)
    assert torch.allclose(y, x @ fac.dense().t() + bias, atol=1e-10)
    assert torch.allclose(monarch_linear.reference(x, w1, w2, bias, m), y, atol=1e-12)
    torch.library.opcheck(OPS.monarch_linear.default, (x.detach(), w1.detach(), w2.detach(), None, m))


def test_blockdiag_and_lowrank_ops_gradcheck():
    w = torch.randn(10, 14, dtype=torch.float64)
    x = torch.randn(2, 3, 14, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    for fac in (blockdense_project(w, 4, 8), blockdiag_project(w, 4)):
        blocks = fac.factors["blocks"].clone().requires_grad_()
        u = fac.factors["u"].clone().requires_grad_() if "u" in fac.factors else None
        assert torch.autograd.gradcheck(lambda a, bl, uu, bb: OPS.blockdiag_linear(a, bl, uu, bb, 10),
                                        (x, blocks, u, bias))
        assert torch.allclose(OPS.blockdiag_linear(x, blocks, u, bias, 10), x @ fac.dense().t() + bias, atol=1e-10)
    fac = lowrank_project(w, rank=3)
    u, v = (fac.factors[k].clone().requires_grad_() for k in ("u", "v"))
    assert torch.autograd.gradcheck(lambda *a: OPS.lowrank_linear(*a), (x, u, v, bias))


def test_pre_merge_uses_dense_below_threshold_only():
    gen = torch.Generator().manual_seed(0)
    fac = _random_monarch(16, 8, 2, gen)
    w1, w2 = fac.factors["w1"], fac.factors["w2"]
    marker = torch.zeros(16, 8)                    # a "dense product" that differs, to see which path ran
    small, big = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(OPS.monarch_linear(small, w1, w2, None, 16, marker, 4), torch.zeros(3, 16))
    assert torch.allclose(OPS.monarch_linear(big, w1, w2, None, 16, marker, 4), big @ fac.dense(torch.float32).t(),
                          atol=1e-4)
    u, v = torch.randn(6, 2), torch.randn(2, 4)
    assert torch.equal(lowrank_linear.reference(torch.randn(2, 4), u, v, None, torch.zeros(6, 4), 2),
                       torch.zeros(2, 6))
    assert blockdiag_linear.OP is OPS.blockdiag_linear.default


# ---- passes on graphs ----------------------------------------------------------------------------------------------
def _op_nodes(program, op):
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target == op]


@pytest.mark.parametrize("spec,op,kind", [
    ("monarch", monarch_linear.OP, "monarch"),
    ("blockdiag", blockdiag_linear.OP, "blockdense"),
    ("blockdiag{form=plain}", blockdiag_linear.OP, "blockdiag"),
    ("lowrank{ratio=0.5,calibrate=16}", lowrank_linear.OP, "lowrank"),
])
def test_demo_model_rewrite_reports_each_layer(tiny_gpt, spec, op, kind):
    model, args = tiny_gpt
    r = rewrite(model, args, passes=spec, verify=True)
    res = r.report.passes[0]
    assert [s["site"] for s in res.sites] == [f"blocks.{i}.{k}" for i in range(2)
                                              for k in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")]
    for s in res.sites:
        assert s["status"] == "rewritten" and s["kind"] == kind
        assert s["params_after"] < s["params_before"] and s["flops_after"] < s["flops_before"]
        # calibrated: the output error on the calibration data is what is minimised (weight error may exceed 1)
        assert s["weight_error"] > 0 and 0 < s["output_error"] < 1 and 0 < s["calibrated_error"] < 1
    assert len(_op_nodes(r.program, op)) == 12
    assert not any(name.endswith("mlp.fc1.weight") for name in r.program.state_dict)
    out, ref = r.module()(*args), model(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert res.error_vs_original is not None and res.params_after["params"] < res.params_before["params"]


def test_exactly_structured_weights_rewrite_exactly_and_train(tiny_gpt):
    model, args = tiny_gpt
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("blocks"):
                mod.weight.copy_(monarch_project(mod.weight, 4).dense(torch.float32))
    r = rewrite(model, args, passes="monarch{blocks=4}")
    assert torch.allclose(r.module()(*args), model(*args), atol=1e-4, rtol=1e-4)
    assert all(s["weight_error"] < 1e-5 for s in r.report.passes[0].sites)
    mod = r.module()
    mod(*args).square().mean().backward()
    grads = [p.grad for n, p in mod.named_parameters() if "monarch_w" in n]
    assert len(grads) == 24 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_decompose_lowers_to_aten(tiny_gpt):
    model, args = tiny_gpt
    for spec in ("monarch{blocks=4}", "blockdiag{blocks=4}", "lowrank{rank=8}"):
        kept = rewrite(model, args, passes=spec)
        lowered = rewrite(model, args, passes=spec, decompose=True)
        targets = {str(n.target) for n in lowered.program.graph.nodes if n.op == "call_function"}
        assert not any(t.startswith("rewrite.") for t in targets), targets
        assert torch.allclose(lowered.module()(*args), kept.module()(*args), atol=1e-5)


def test_gpt2_conv1d_addmm_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():   # make every Conv1D weight (in, out) exactly Monarch, so the rewrite must be exact
        for name, mod in model.named_modules():
            if type(mod).__name__ == "Conv1D":
                mod.weight.copy_(monarch_project(mod.weight.t(), 4).dense(torch.float32).t())
    ids = torch.randint(0, 128, (2, 8))
    r = rewrite(model, (ids,), passes="monarch{blocks=4}", example_kwargs={"use_cache": False})
    sites = r.report.passes[0].sites
    assert len(sites) == 8 and {s["site"].rsplit(".", 1)[-1] for s in sites} == {"c_attn", "c_proj", "c_fc"}
    assert all(s["status"] == "rewritten" and s["weight_error"] < 1e-5 for s in sites)
    assert len(_op_nodes(r.program, monarch_linear.OP)) == 8
    want = model(ids, use_cache=False).logits
    got = r.module()(ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tiny = torch.nn.Linear(3, 5)
        self.odd = torch.nn.Linear(10, 12)
        self.ok = torch.nn.Linear(12, 16)

    def forward(self, x):
        return self.ok(self.odd(torch.cat([self.tiny(x[..., :3]), x[..., 3:8]], -1)))


def test_blocks_that_cannot_apply_skip_with_reason():
    torch.manual_seed(0)
    model, x = _Small().eval(), torch.randn(2, 4, 10)
    r = rewrite(model, (x,), passes="monarch{blocks=4,pad=false}")
    by = {s["site"]: s for s in r.report.passes[0].sites}
    assert by["tiny"]["status"] == "skipped" and "smaller than blocks=4" in by["tiny"]["reason"]
    assert by["odd"]["status"] == "skipped" and "pad=false" in by["odd"]["reason"]
    assert by["ok"]["status"] == "rewritten"
    r = rewrite(model, (x,), passes="blockdiag{blocks=4}")   # padding: 10 -> 12 handled
    by = {s["site"]: s for s in r.report.passes[0].sites}
    assert by["odd"]["status"] == "rewritten" and by["tiny"]["status"] == "skipped"
    assert r.module()(x).shape == model(x).shape


def test_structured_hits_budget_and_prints_table(tiny_gpt):
    model, args = tiny_gpt
    r = rewrite(model, args, passes="structured{budget=0.4}", verify=True)
    res = r.report.passes[0]
    assert len(res.sites) == 12
    after = sum(s["params_after"] for s in res.sites)
    before = sum(s["params_before"] for s in res.sites)
    assert after <= 0.4 * before
    table = res.messages[-1]
    assert "choice" in table and all(s["site"] in table for s in res.sites)
    loose = rewrite(model, args, passes="structured{budget=0.9}").report.passes[0]
    assert sum(s["params_after"] for s in loose.sites) <= 0.9 * before
    # the leftover budget is spent: more parameters than the tight budget, and close to the loose one
    assert sum(s["params_after"] for s in loose.sites) > 0.75 * before
    assert max(s.get("output_error") or 0 for s in loose.sites) <= max(s["output_error"] for s in res.sites
                                                                       if s["status"] == "rewritten")


def test_option_validation():
    with pytest.raises(UserError, match="one of rank, ratio, energy"):
        rewrite(torch.nn.Linear(4, 4), (torch.randn(2, 4),), passes="lowrank{rank=2,ratio=0.5}")
    with pytest.raises(UserError, match="blocks"):
        rewrite(torch.nn.Linear(4, 4), (torch.randn(2, 4),), passes="monarch{blocks=0}")


@settings(max_examples=12)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=2), st.integers(4, 24), st.integers(4, 24),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_op_output_shapes_and_dtypes(lead, n, m, dtype):
    w = torch.randn(m, n, dtype=dtype)
    x = torch.randn(*lead, 2, n, dtype=dtype)
    bias = torch.randn(m, dtype=dtype)
    mon, bd, lr = monarch_project(w, 4), blockdense_project(w, 4, 4), lowrank_project(w, rank=2)
    outs = [OPS.monarch_linear(x, mon.factors["w1"], mon.factors["w2"], bias, m),
            OPS.blockdiag_linear(x, bd.factors["blocks"], bd.factors["u"], bias, m),
            OPS.lowrank_linear(x, lr.factors["u"], lr.factors["v"], bias)]
    for y, fac in zip(outs, (mon, bd, lr)):
        assert y.shape == (*lead, 2, m) and y.dtype == dtype
        want = x.double() @ fac.dense().t() + bias.double()
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        assert (y.double() - want).abs().max() <= tol * want.abs().max().clamp_min(1)


def test_bf16_model_rewrite_keeps_dtype():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    r = rewrite(model, (x,), passes="monarch{blocks=4}")
    out = r.module()(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 16)
    assert all(v.dtype == torch.bfloat16 for k, v in r.program.state_dict.items() if "monarch" in k)
    assert [s["status"] for s in r.report.passes[0].sites] == ["rewritten", "rewritten"]


def test_pre_merge_option_in_pass(tiny_gpt):
    model, args = tiny_gpt                          # 2 × 16 = 32 rows per layer
    plain = rewrite(model, args, passes="monarch{blocks=4}")
    merged = rewrite(model, args, passes="monarch{blocks=4,pre_merge=true,pre_merge_tokens=64}")
    assert sum(k.endswith("monarch_premerged") for k in merged.program.state_dict) == 12
    assert torch.allclose(merged.module()(*args), plain.module()(*args), atol=1e-4)
    for s in merged.report.passes[0].sites:        # the dense path runs at 32 rows: FLOPs unchanged
        assert s["flops_after"] == s["flops_before"]
    below = rewrite(model, args, passes="monarch{blocks=4,pre_merge=true,pre_merge_tokens=8}").report.passes[0]
    assert all(s["flops_after"] < s["flops_before"] for s in below.sites)


def test_structured_allocation_spends_leftover_budget_on_best_cost_per_param():
    from passes.structured import StructuredPass
    layer = lambda c_half, c_quarter: [(100, 0.0), (50, c_half), (25, c_quarter)]  # noqa: E731
    options = [layer(0.2, 0.5), layer(0.1, 0.4), layer(0.35, 0.4)]
    chosen, total = StructuredPass.allocate(options, target=125)
    # two upgrades of 25 params fit; the third layer gains least per parameter (0.05 / 25) and stays
    assert chosen == [1, 1, 2] and total == 125
    assert StructuredPass.allocate(options, target=300) == ([0, 0, 0], 300)      # everything fits: all dense
    assert StructuredPass.allocate(options, target=10) == ([2, 2, 2], 75)        # nothing fits: the cheapest


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 4), st.floats(0.2, 1.0))
def test_structured_allocation_fits_and_is_near_optimal(seed, layers, per_layer, fraction):
    """Brute force over every choice: the allocation stays within the target, and its cost exceeds the best
    choice's by at most one layer's cost (the LP relaxation of a multiple-choice knapsack splits at most one layer;
    the Lagrangian choice is that solution with the split layer at its cheaper option)."""
    import itertools

    from passes.structured import StructuredPass
    g = torch.Generator().manual_seed(seed)
    options = []
    for _ in range(layers):
        params = sorted(torch.randint(1, 50, (per_layer - 1,), generator=g).tolist()) + [60]
        costs = torch.rand(per_layer - 1, generator=g).sort(descending=True).values.tolist() + [0.0]
        options.append(list(zip(params, costs)))
    cheapest = sum(min(p for p, _ in o) for o in options)
    target = cheapest + fraction * (60 * layers - cheapest)
    chosen, total = StructuredPass.allocate(options, target)
    assert total <= target and total == sum(o[j][0] for o, j in zip(options, chosen))
    cost = sum(o[j][1] for o, j in zip(options, chosen))
    best = min(sum(o[j][1] for o, j in zip(options, pick))
               for pick in itertools.product(*[range(len(o)) for o in options])
               if sum(o[j][0] for o, j in zip(options, pick)) <= target)
    assert cost <= best + max(c for o in options for _, c in o) + 1e-12


@pytest.mark.parametrize("kind", ["monarch", "blockdiag"])
def test_dense_form_in_column_chunks_is_the_whole_identity_product(kind):
    """Factored.dense applies the layer to the identity a few columns at a time (bounded memory on wide layers):
    bit-identical to applying it to the whole identity at once."""
    from rewriter.projections import blockdiag_project, monarch_project
    w = torch.randn(36, 60, generator=torch.Generator().manual_seed(1))
    fac = (monarch_project if kind == "monarch" else blockdiag_project)(w, 4)
    whole = fac.dense(rows=10**9)
    assert torch.equal(fac.dense(rows=7), whole)
    assert torch.allclose(whole.float(), fac.dense(torch.float32, rows=13), atol=1e-5)


@pytest.mark.parametrize("out_features,bias", [(64, True), (60, False)])
def test_monarch_op_path_runs_off_the_cpu(out_features, bias):
    """The op keeps reusable workspaces on the CPU only; on any other device (CUDA; here meta, which stands in
    for it) it allocates its intermediates. Regression: on CUDA the workspace was None and every Monarch layer
    crashed."""
    from rewriter.ops.monarch_linear import factored
    mon = monarch_project(torch.randn(out_features, 64), 4)
    w1, w2 = mon.factors["w1"], mon.factors["w2"]
    b = torch.randn(out_features) if bias else None
    x = torch.randn(3, 5, 64)
    want = factored(x, w1, w2, b, out_features)
    meta = [t.to("meta") if t is not None else None for t in (x, w1, w2, b)]
    got = factored(*meta, out_features)
    assert got.device.type == "meta" and got.shape == want.shape == (3, 5, out_features)
    ref = x.double() @ mon.dense().t() + (b.double() if bias else 0)
    assert (want.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
