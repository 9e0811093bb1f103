"""Calibration data and statistics (rewriter/calibration.py), calibrated projections (rewriter/weighted.py) and the
binary-code fit against round-to-nearest (rewriter/bcq_fit.py)."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter import bcq, bcq_fit, calibration, rewrite, weighted
from rewriter.errors import UserError
from rewriter.projections import (blockdense_project, blockdiag_project, lowrank_project, monarch_project)
from tests.helpers import StubContext


def _gram(seed, n, rows=400, spread=2.0):
    """An anisotropic input Gram: correlated inputs with log-normal channel scales and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64))
    scales[torch.randperm(n, generator=g)[: max(1, n // 32)]] *= 10
    mix = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.linspace(2, 0.05, n, dtype=torch.float64)) \
        @ mix * scales
    return x.t() @ x / rows


def _err(w, fac, h):
    return weighted.relative_error(w, fac.dense(), h)


# ---- calibrated projections --------------------------------------------------------------------------------------
@given(m=st.integers(4, 40), n=st.integers(4, 40), rank=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_svd_llm_is_output_optimal(m, n, rank, seed):
    """SVD-LLM's whitened truncation: its calibrated error is the whitened SVD tail, never above plain SVD's,
    and no rank-r perturbation of it does better."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    h = _gram(seed, n)
    cal, plain = lowrank_project(w, rank=rank, gram=h), lowrank_project(w, rank=rank)
    sv = torch.linalg.svdvals(w @ weighted.cholesky(weighted.damped(h)))
    r = cal.info["rank"]
    hd = weighted.damped(h)
    d = w - cal.dense()
    tail = float(((d @ hd) * d).sum() / ((w @ hd) * w).sum()) ** 0.5
    assert tail == pytest.approx(float((sv[r:] ** 2).sum() / (sv ** 2).sum()) ** 0.5, rel=1e-6, abs=1e-9)
    assert _err(w, cal, hd) <= _err(w, plain, hd) + 1e-9
    u, v = cal.factors["u"], cal.factors["v"]
    for scale in (1e-3, 1e-2):
        bumped = (u + scale * torch.randn(u.shape, generator=g, dtype=torch.float64)) @ v
        assert weighted.relative_error(w, bumped, hd) >= _err(w, cal, hd) - 1e-9


@given(m=st.integers(4, 40), n=st.integers(4, 40), rank=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_row_weighted_truncation_is_optimal_for_its_weighted_error(m, n, rank, seed):
    """whitened_svd with row weights f (the output Fisher): its rank-r cut minimises Σ_i f_i·(ΔW·H·ΔWᵀ)_ii (H the
    damped Gram) — exactly the tail of the SVD of D·W·L, never above the unweighted cut, and no rank-r
    perturbation does better."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    h = _gram(seed, n)
    hd = weighted.damped(h)
    f = torch.rand(m, generator=g, dtype=torch.float64) * 10 + 0.1

    def weighted_error(approx):
        return float(f @ weighted.row_errors(w, approx, hd))

    r = min(rank, m, n)
    fw_u, fw_v = weighted.cut(weighted.whitened_svd(w, h, f), r)
    plain_u, plain_v = weighted.cut(weighted.whitened_svd(w, h), r)
    best = weighted_error(fw_u @ fw_v)
    sv = torch.linalg.svdvals(f.sqrt()[:, None] * w @ weighted.cholesky(hd))
    assert best == pytest.approx(float((sv[r:] ** 2).sum()), rel=1e-6, abs=1e-9)
    assert best <= weighted_error(plain_u @ plain_v) + 1e-9
    for scale in (1e-3, 1e-2):
        bumped = (fw_u + scale * torch.randn(fw_u.shape, generator=g, dtype=torch.float64)) @ fw_v
        assert weighted_error(bumped) >= best - 1e-9


@given(m=st.integers(8, 36), n=st.integers(8, 36), blocks=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_calibrated_structured_projections_never_worse_under_h(m, n, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    h = _gram(seed, n)
    pairs = [(monarch_project(w, blocks, gram=h), monarch_project(w, blocks)),
             (blockdiag_project(w, blocks, gram=h), blockdiag_project(w, blocks)),
             (blockdense_project(w, blocks, None, gram=h), blockdense_project(w, blocks, None))]
    for cal, plain in pairs:
        assert cal.factors.keys() == plain.factors.keys()
        assert all(cal.factors[k].shape == plain.factors[k].shape for k in cal.factors)
        assert _err(w, cal, h) <= _err(w, plain, h) + 1e-9


def test_calibration_helps_a_lot_on_anisotropic_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    h = _gram(1, 64, spread=1.5)
    for cal, plain in [(monarch_project(w, 4, gram=h), monarch_project(w, 4)),
                       (blockdense_project(w, 4, 32, gram=h), blockdense_project(w, 4, 32)),
                       (lowrank_project(w, rank=8, gram=h), lowrank_project(w, rank=8))]:
        assert _err(w, cal, h) < 0.7 * _err(w, plain, h), cal.kind


@pytest.mark.parametrize("blocks", [2, 4])
def test_exactly_structured_weights_stay_exact_when_calibrated(blocks):
    g = torch.Generator().manual_seed(blocks)
    h = _gram(3, 32)
    exact = monarch_project(torch.randn(24, 32, generator=g, dtype=torch.float64), blocks).dense()
    assert _err(exact, monarch_project(exact, blocks, gram=h), h) < 1e-6
    exact = blockdense_project(torch.randn(24, 32, generator=g, dtype=torch.float64), blocks, 8).dense()
    assert _err(exact, blockdense_project(exact, blocks, 8, gram=h), h) < 1e-6


def test_blockdiag_conditional_mean_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    h = _gram(2, 16)
    blocks = blockdiag_project(w, 4, gram=h).factors["blocks"]            # (4, 3, 4)
    hd = weighted.damped(h)
    for k in range(4):   # each row of block k solves min (w - ŵ) H (w - ŵ)ᵀ over ŵ supported on columns of block k
        cols = slice(4 * k, 4 * k + 4)
        for i in range(3):
            row = w[3 * k + i]
            want = torch.linalg.solve(hd[cols, cols], hd[cols] @ row)
            assert torch.allclose(blocks[k, i], want, atol=1e-9)


# ---- binary codes vs round-to-nearest --------------------------------------------------------------------------------
def _llm_like_layer(seed, dist, out_f, in_f, correlated):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    if dist == "laplace":
        w = (torch.rand(out_f, in_f, generator=g, dtype=torch.float64) - 0.5).sign() \
            * -torch.log(torch.rand(out_f, in_f, generator=g, dtype=torch.float64))
    elif dist == "t5":
        w = w / torch.randn(5, out_f, in_f, generator=g, dtype=torch.float64).square().mean(0).sqrt()
    w = (w * torch.exp(0.5 * torch.randn(out_f, 1, generator=g, dtype=torch.float64)) * 0.02).float()
    if correlated:
        h = _gram(seed, in_f, rows=512, spread=1.0)
    else:
        scales = torch.exp(torch.randn(in_f, generator=g, dtype=torch.float64))
        scales[torch.randperm(in_f, generator=g)[: max(1, in_f // 64)]] *= 20
        x = torch.randn(512, in_f, generator=g, dtype=torch.float64) * scales
        h = x.t() @ x / 512
    return w, h.float()


@given(seed=st.integers(0, 2**16), dist=st.sampled_from(["gauss", "laplace", "t5"]), correlated=st.booleans(),
       bits=st.integers(2, 4), config=st.sampled_from([(64, 1), (128, 2)]), out_f=st.integers(8, 48),
       blocks=st.integers(2, 3), code=st.sampled_from(["affine", "affine-coded", "pow2"]))
@settings(max_examples=30)
def test_shiftadd_never_worse_than_round_to_nearest_at_equal_bits(seed, dist, correlated, bits, config, out_f,
                                                                   blocks, code):
    """Calibrated shiftadd vs asymmetric min/max RTN at the same bits per weight, on the calibrated output error,
    for LLM-like layers (heavy-ish tails, per-row scales, outlier channels): RTN with fp16 scale and zero point, or —
    for the affine code with 6-bit coded scales and offsets (the default, group 32) — RTN with them coded alike."""
    from passes.shiftadd import layer_bits, quantize_layer
    group, terms = config
    terms = 1 if code != "pow2" else terms
    scale_bits = 6 if code == "affine-coded" else 0
    group = 32 if scale_bits else group
    code = "affine" if scale_bits else code
    w, h = _llm_like_layer(seed, dist, out_f, 128 * blocks, correlated)
    q, figures = quantize_layer(w, h, bits, group, 2, terms, 1, code, scale_bits=scale_bits)
    rtn_group = group if code == "affine" else bcq_fit.rtn_group(bits, group, terms)
    if not scale_bits:         # (coded: the baseline is the same layout, so the same bits by construction)
        assert bcq_fit.rtn_bits_per_weight(bits, rtn_group) >= layer_bits(bits, group, terms, w.shape[1], code) - 1e-9
    shared_exponents = 8 * q.exponents.numel() / w.numel() if code == "affine" else 0
    assert q.bits_per_weight == pytest.approx(layer_bits(bits, q.group, q.exponents.shape[-1], w.shape[1], code,
                                                         scale_bits) + shared_exponents)
    got = weighted.relative_error(w, q.dequantize(), h)
    assert got == pytest.approx(figures["calibrated_error"])
    rtn = bcq_fit.rtn(w, bits, rtn_group, scale_bits=scale_bits)
    assert figures["rtn_error"] == pytest.approx(weighted.relative_error(w, rtn, h))
    assert got <= figures["rtn_error"], (got, figures)
    terms_used = 1 if code == "affine" else q.exponents.shape[-1]
    assert layer_bits(bits, q.group, terms_used, w.shape[1], code, scale_bits) <= \
        layer_bits(bits, group, terms, w.shape[1], code, scale_bits) + 1e-9


@given(seed=st.integers(0, 2**16), bits=st.integers(2, 4), terms=st.integers(1, 2))
@settings(max_examples=10)
def test_scale_refit_never_increases_the_output_error(seed, bits, terms):
    w, h = _llm_like_layer(seed, "gauss", 16, 128, True)
    exps, pattern = bcq_fit.gptq(w, h, bits, 64, terms, 2)
    before = bcq_fit.objective(w, bcq_fit.dequant_parts(exps, pattern, bits), h)
    refit = bcq_fit.refit_scales(w, h, exps, pattern, bits, terms, 2)
    assert bcq_fit.objective(w, bcq_fit.dequant_parts(refit, pattern, bits), h) <= before * (1 + 1e-6) + 1e-9


def test_rtn_is_exact_on_its_own_grid_and_documented_bits():
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (4, 64), generator=g).float()
    w = (levels * 0.125 - 1.0)          # a 4-bit asymmetric grid, representable scale/zero in fp16
    assert torch.equal(bcq_fit.rtn(w, 4, 64), w)
    assert bcq_fit.rtn_bits_per_weight(4, 64) == 4.5 and bcq_fit.rtn_group(4, 64, 1) == 64
    assert bcq_fit.rtn_group(4, 128, 2) == 64 and bcq_fit.rtn_group(3, 64, 1) == 85


# ---- calibration data ----------------------------------------------------------------------------------------------
def test_self_samples_from_the_causal_lm_deterministically(tiny_gpt):
    model, args = tiny_gpt
    ctx = StubContext(model, args)
    io = calibration.describe(ctx)
    assert io.lm and io.vocab == 256 and not io.dynamic
    spec = calibration.DataSpec("self", 4, 99, seed=3)
    data = calibration.batches(ctx, spec)
    assert len(data) == 2 and all(b[0].shape == args[0].shape for b in data)   # static: the program's shape
    ids = torch.cat([b[0] for b in data])
    again = torch.cat([b[0] for b in calibration.batches(StubContext(model, args), spec)])
    other = torch.cat([b[0] for b in calibration.batches(StubContext(model, args),
                                                         calibration.DataSpec("self", 4, 99, 4))])
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert int(ids.min()) >= 0 and int(ids.max()) < 256
    assert any("sampled from the model itself" in m for m in ctx.messages)


def test_samples_follow_the_models_distribution():
    """A bigram 'model' that always predicts token (t + 1) mod V almost surely: sampled sequences follow it."""
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 11)
            with torch.no_grad():
                self.emb.weight.copy_(torch.roll(torch.eye(11), 1, 1) * 30)

        def forward(self, ids):
            return self.emb(ids)

    ctx = StubContext(Bigram(), (torch.zeros(2, 6, dtype=torch.long),))
    ids = torch.cat([b[0] for b in calibration.batches(ctx, calibration.DataSpec("self", 6, 6, 0))])
    assert torch.equal(ids[:, 1:], (ids[:, :-1] + 1) % 11)


def test_draws_follow_each_rows_distribution_and_skip_impossible_tokens():
    """Inverse-CDF sampling: frequencies match the softmax (binomial 5-sigma bounds over 40,000 draws, fixed seed),
    a zero-probability token never comes out, and the same generator state gives the same tokens."""
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    logits = probs.log().repeat(40_000 // 3 + 1, 1)[:40_000 - 40_000 % 3]
    tokens = calibration._draw(logits, torch.Generator().manual_seed(0))
    again = calibration._draw(logits, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    if torch.cuda.is_available():      # CUDA logits are drawn on the GPU: the same tokens, returned on the CPU
        assert torch.equal(calibration._draw(logits.cuda(), torch.Generator().manual_seed(0)), tokens)
    for r in range(3):
        got = torch.bincount(tokens[r::3], minlength=4).double()
        n = got.sum()
        p = probs[r]
        assert torch.all((got / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12), (r, got / n)
        assert torch.all(got[p == 0] == 0)


def test_dynamic_programs_take_seq_long_batches(tiny_gpt):
    model, args = tiny_gpt
    ctx = StubContext(model, args, dynamic=True)
    data = calibration.batches(ctx, calibration.DataSpec("self", 5, 12, 0), rows=2)
    assert [tuple(b[0].shape) for b in data] == [(2, 12), (2, 12), (1, 12)]


def test_non_generative_models_get_inputs_like_their_examples():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(64, 6) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 10
    ctx = StubContext(model, (x,))
    io = calibration.describe(ctx)
    assert not io.lm and io.ids_index is None
    data = calibration.batches(ctx, calibration.DataSpec("self", 256, 8, 0))
    xs = torch.cat([b[0] for b in data])
    assert xs.shape[1] == 6
    assert torch.allclose(xs.mean(0), x.mean(0), atol=1.5) and torch.allclose(xs.std(0), x.std(0), rtol=0.3)


def test_layer_grams_are_the_mean_input_outer_products(tiny_gpt):
    model, args = tiny_gpt
    ctx = StubContext(model, args)
    spec = calibration.DataSpec("self", 4, 16, 0)
    stats = calibration.layer_stats(ctx, spec)
    assert calibration.layer_stats(ctx, spec) is stats            # captured once per pipeline
    from rewriter.matchers.linear import find_linears
    site = next(s for s in find_linears(ctx.gm) if s.name == "blocks.1.mlp.fc2")
    xs = []
    for flat in calibration.batches(ctx, spec):
        xs.append(_input_of(ctx.gm, site.x, flat))
    x = torch.cat(xs).double()
    assert torch.allclose(stats.gram(site.name).double(), x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert stats.mean_probs is not None and stats.mean_probs.sum().item() == pytest.approx(1.0, abs=1e-4)


def _input_of(gm, node, flat):
    got = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n is node:
                got["x"] = value.reshape(-1, value.shape[-1])
            return value

    with torch.no_grad():
        Capture(gm).run(*flat)
    return got["x"]


def test_data_files(tmp_path, tiny_gpt):
    model, args = tiny_gpt
    ids = torch.randint(0, 256, (5, 40), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with open(tmp_path / "ids.jsonl", "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    for name in ("ids.pt", "ids.jsonl"):
        ctx = StubContext(model, args)
        got = torch.cat([b[0] for b in calibration.batches(ctx, calibration.DataSpec(str(tmp_path / name), 4, 16))])
        assert torch.equal(got, ids.reshape(-1)[:64].view(4, 16))
    # more samples than the 12 windows the 200 tokens make: the rest start at seeded random offsets
    ctx = StubContext(model, args)
    got = torch.cat([b[0] for b in calibration.batches(ctx, calibration.DataSpec(str(tmp_path / "ids.pt"), 20, 16))])
    stream = ids.reshape(-1)
    assert got.shape == (20, 16) and torch.equal(got[:12], stream[:192].view(12, 16))
    assert all(any(torch.equal(row, stream[s:s + 16]) for s in range(185)) for row in got[12:])
    assert len({tuple(row.tolist()) for row in got[12:]}) > 1 and any("random offsets" in m for m in ctx.messages)
    again = torch.cat([b[0] for b in calibration.batches(StubContext(model, args),
                                                         calibration.DataSpec(str(tmp_path / "ids.pt"), 20, 16))])
    assert torch.equal(got, again)
    # a static program shorter than seq reads as many tokens of a text as N sequences of seq: 3·32 / 16 windows
    got = torch.cat([b[0] for b in calibration.batches(StubContext(model, args),
                                                       calibration.DataSpec(str(tmp_path / "ids.pt"), 3, 32))])
    assert torch.equal(got, stream[:96].view(6, 16))
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(UserError, match="tokenizer") as e:
        calibration.batches(StubContext(model, args), calibration.DataSpec(str(tmp_path / "t.txt"), 4, 16))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        calibration.batches(StubContext(model, args), calibration.DataSpec(str(tmp_path / "none.pt"), 4, 16))
    torch.save(ids + 1000, tmp_path / "big.pt")
    with pytest.raises(UserError, match="vocabulary"):
        calibration.batches(StubContext(model, args), calibration.DataSpec(str(tmp_path / "big.pt"), 4, 16))


def test_an_encoder_reads_windows_as_long_as_its_example_inputs(tmp_path):
    """A dynamic program that is not a causal LM, calibrated on a text, gets windows of its example inputs' length
    (8 here) when those are shorter than seq (32) — as many tokens as asked: 3·32/8 windows, 2·32/8 a batch."""
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = torch.nn.Embedding(256, 8), torch.nn.Linear(8, 8)

        def forward(self, ids):
            h = self.emb(ids)
            return self.proj(h + h.mean(1, keepdim=True))     # every position sees every other: not causal

    stream = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    torch.save(stream, tmp_path / "ids.pt")
    ctx = StubContext(Encoder(), (torch.zeros(2, 8, dtype=torch.long),), dynamic=True)
    assert not calibration.describe(ctx).lm and calibration.describe(ctx).dynamic
    data = calibration.batches(ctx, calibration.DataSpec(str(tmp_path / "ids.pt"), 3, 32), rows=2)
    assert [b[0].shape for b in data] == [(8, 8), (4, 8)]
    assert torch.equal(torch.cat([b[0] for b in data]), stream[:96].view(12, 8))


@pytest.mark.parametrize("spec", ["monarch{calibrate=-1}", "lowrank{data=x.csv}", "shiftadd{seq=1}",
                                  "structured{calibrate=-2}", "vq-logits{data=a.bin}"])
def test_bad_calibration_options_are_one_line_errors(spec):
    from rewriter.pass_base import parse_pass
    with pytest.raises(UserError) as e:
        parse_pass(spec)
    assert "\n" not in str(e.value)


def test_calibrate_zero_is_data_free_and_default_is_calibrated(tiny_gpt):
    model, args = tiny_gpt
    free = rewrite(model, args, passes="monarch{calibrate=0}").report.passes[0]
    cal = rewrite(model, args, passes="monarch{calibrate=4}").report.passes[0]
    assert not free.messages and all("calibrated_error" not in s for s in free.sites)
    assert all("calibrated_error" in s for s in cal.sites)
    assert any("calibration data" in m for m in cal.messages)


@pytest.mark.parametrize("spec", ["lowrank{ratio=0.5,calibrate=2}", "monarch{calibrate=2}",
                                  "blockdiag{calibrate=2}", "structured{calibrate=2}",
                                  "shiftadd{bits=3,group=32,calibrate=2}", "vq-logits{codes=64,calibrate=2,iters=2}",
                                  "monarch{calibrate=2},heal{steps=1,samples=4}"])
def test_passes_create_no_tensor_off_the_weights_device(tiny_gpt, spec, monkeypatch):
    """Every tensor a pass creates names its device: run each with torch's default device set to meta."""
    from rewriter.pass_base import Pass
    model, args = tiny_gpt
    originals = {}
    from rewriter.pass_base import registry
    for cls in registry().values():
        originals[cls] = cls.run

        def run(self, ctx, _orig=cls.run):
            with torch.device("meta"):
                return _orig(self, ctx)
        monkeypatch.setattr(cls, "run", run)
    r = rewrite(model, args, passes=spec)
    for name, t in list(r.program.state_dict.items()):
        assert t.device.type == "cpu", name
    assert Pass  # the base class is untouched


@pytest.mark.parametrize("spec", ["monarch{blocks=2,calibrate=4}", "shiftadd{bits=3,group=32,calibrate=4}",
                                  "shiftadd{bits=3,group=32,calibrate=4,budget=3}"])
def test_grams_in_chunks_give_the_same_program(tiny_gpt, spec, monkeypatch):
    """Past the Gram budget a pass captures its layers' statistics chunk by chunk (bounded memory for big models)
    and rewrites only after the last chunk, so every chunk sees the program as the pass received it: the result
    is bit-identical to capturing every Gram at once."""
    model, args = tiny_gpt
    whole = rewrite(model, args, spec).program.state_dict
    captured = []
    real = calibration._capture_stats

    def spy(ctx, data_spec, sites):
        captured.append(len(sites))
        return real(ctx, data_spec, sites)
    monkeypatch.setattr(calibration, "_capture_stats", spy)
    monkeypatch.setattr(calibration, "GRAM_BUDGET", 2 * 64 * 64 * 4)     # two 64-wide Grams per chunk
    chunked = rewrite(model, args, spec).program.state_dict
    assert len(captured) > 2 and max(captured) < 12, captured
    assert whole.keys() == chunked.keys()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize("raw, want", [("", 400 * 2**20), ("1048576", 2**20), ("512M", 512 * 2**20), ("4G", 4 * 2**30),
                                       ("64kb", 64 * 2**10)])
def test_gram_budget_reads_the_environment(raw, want, monkeypatch):
    monkeypatch.setenv("REWRITE_GRAM_BYTES", raw)
    assert calibration.gram_budget() == want


@pytest.mark.parametrize("raw", ["lots", "-5", "0", "12X"])
def test_bad_gram_budget_is_a_one_line_user_error(raw, monkeypatch, tiny_gpt):
    """A malformed $REWRITE_GRAM_BYTES was an import-time traceback; it is the user's one-line error when a
    calibrating pass needs the budget."""
    monkeypatch.setenv("REWRITE_GRAM_BYTES", raw)
    with pytest.raises(UserError) as e:
        calibration.gram_budget()
    assert "REWRITE_GRAM_BYTES" in str(e.value) and "\n" not in str(e.value)
    model, args = tiny_gpt
    with pytest.raises(UserError, match="REWRITE_GRAM_BYTES"):
        rewrite(model, args, "lowrank{calibrate=2}")


def test_bench_gptq_reference_is_rtn_without_correlations_and_better_with_them():
    """bench.quant_layers' GPTQ reference: with H ∝ I no error is pushed anywhere (it is RTN exactly); with
    correlated inputs it lowers the calibrated output error below RTN's."""
    from bench.quant_layers import gptq_uniform
    w, h = _llm_like_layer(3, "laplace", 24, 128, True)
    assert torch.equal(gptq_uniform(w, torch.eye(128), 4, 64), bcq_fit.rtn(w, 4, 64))
    assert weighted.relative_error(w, gptq_uniform(w, h, 4, 64), h) < \
        0.9 * weighted.relative_error(w, bcq_fit.rtn(w, 4, 64), h)


def test_default_gram_budget_holds_smollm2_whole():
    """The default budget keeps SmolLM2-135M's Grams in one capture shared by every pass (30 decoder layers:
    inputs of q/k/v, o, gate/up of width 576 and of down of width 1536, plus the head's), and cuts a
    TinyLlama-1.1B-shaped model (2048 / 5632) into chunks of two decoder layers."""
    smollm2 = 30 * (3 * 576 ** 2 + 1536 ** 2) * 4 + 576 ** 2 * 4
    tinyllama_layer = (3 * 2048 ** 2 + 5632 ** 2) * 4
    assert smollm2 <= calibration.DEFAULT_GRAM_BYTES
    assert 2 * tinyllama_layer <= calibration.DEFAULT_GRAM_BYTES < 3 * tinyllama_layer
