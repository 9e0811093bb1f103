"""`vq-logits`: k-means (rewriter/kmeans.py), the `rewrite::vq_logits` op, and the pass."""
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter import kmeans, rewrite
from rewriter.errors import UserError
from rewriter.ops import vq_logits as op_mod
from rewriter.pass_base import parse_pass

OP = torch.ops.rewrite.vq_logits.default
aten = torch.ops.aten


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class _LM(torch.nn.Module):
    """Embedding → linear → head (optionally tied, with bias) → optional log_softmax / softmax."""

    def __init__(self, vocab=40, dim=8, rows=None, tail="none", bias=False, tied=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=bias)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.head.weight.copy_(rows if rows is not None else torch.randn(vocab, dim, generator=g))
            if bias:
                self.head.bias.copy_(torch.randn(vocab, generator=g))
        if tied:
            self.head.weight = self.emb.weight
        self.tail = tail

    def forward(self, ids):
        z = self.head(torch.tanh(self.mix(self.emb(ids))))
        if self.tail == "log_softmax":
            return torch.log_softmax(z, -1)
        if self.tail == "softmax":
            return torch.softmax(z, -1)
        return z


def _repeated_rows(k, vocab, dim, seed):
    g = torch.Generator().manual_seed(seed)
    distinct = torch.randn(k, dim, generator=g)
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (vocab - k,), generator=g)])
    return distinct[labels[torch.randperm(vocab, generator=g)]]


# ---- k-means -----------------------------------------------------------------------------------------------
@given(k=st.integers(1, 12), extra=st.integers(1, 30), dim=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_kmeans_recovers_exactly_k_distinct_rows(k, extra, dim, seed):
    x = _repeated_rows(k, k + extra, dim, seed)
    centres, labels = kmeans.kmeans(x, k, iters=3, seed=seed)
    assert labels.shape == (k + extra,) and labels.min() >= 0 and labels.max() < k
    assert torch.equal(centres[labels], x)


def test_kmeans_deterministic_and_seeded():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    a = kmeans.kmeans(x, 16, iters=5, seed=3)
    b = kmeans.kmeans(x, 16, iters=5, seed=3)
    c = kmeans.kmeans(x, 16, iters=5, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # Lloyd never increases the k-means objective
    obj = [((x - cs[lab]) ** 2).sum() for cs, lab in (kmeans.kmeans(x, 16, iters=i, seed=3) for i in (0, 1, 5))]
    assert obj[0] >= obj[1] >= obj[2]


def test_kmeans_fewer_distinct_rows_than_k():
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    centres, labels = kmeans.kmeans(x, 4, iters=2, seed=0)
    assert torch.equal(centres[labels], x)


# ---- the op ------------------------------------------------------------------------------------------------
@given(k=st.integers(1, 6), vocab=st.integers(7, 20), dim=st.integers(1, 5), bias=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_op_matches_dense_head_built_from_codebook(k, vocab, dim, bias, seed):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, dim, generator=g)
    code_map = torch.randint(0, k, (vocab,), generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    h = torch.randn(2, 3, dim, generator=g)
    dense = F.linear(h, codebook[code_map], b)
    assert torch.allclose(OP(h, codebook, code_map.int(), b), dense, atol=1e-5)
    # fused log-softmax over codes with the log|cluster| correction == full log_softmax over V
    assert torch.allclose(OP(h, codebook, code_map, b, True), torch.log_softmax(dense, -1), atol=1e-5)


def test_op_autograd():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(3, 4, generator=g, requires_grad=True)
    code_map = torch.tensor([0, 2, 2, 1, 0, 2])
    h = torch.randn(5, 4, generator=g, requires_grad=True)
    weights = torch.randn(5, 6, generator=g)
    for log_sm in (False, True):
        out = OP(h, codebook, code_map, None, log_sm)
        gh, gc = torch.autograd.grad((out * weights).sum(), (h, codebook))
        dense = F.linear(h, codebook[code_map])
        dense = torch.log_softmax(dense, -1) if log_sm else dense
        eh, ec = torch.autograd.grad((dense * weights).sum(), (h, codebook))
        assert torch.allclose(gh, eh, atol=1e-5) and torch.allclose(gc, ec, atol=1e-5)


# ---- the pass ----------------------------------------------------------------------------------------------
@given(k=st.integers(2, 10), seed=st.integers(0, 2**10))
@settings(max_examples=10)
def test_pass_exact_when_rows_repeat(k, seed):
    vocab = 24
    model = _LM(vocab=vocab, rows=_repeated_rows(k, vocab, 8, seed), bias=True, seed=seed).eval()
    ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(seed))
    r = rewrite(model, (ids,), passes=f"vq-logits{{codes={k},iters=3,seed={seed}}}", verify=True)
    assert r.report.passes[0].error_vs_original < 1e-5
    gm = r.program.graph_module
    assert OP in _ops(gm) and aten.linear.default in _ops(gm)   # the `mix` linear stays
    site = r.report.passes[0].sites[0]
    assert site["top1_agreement"] == 1.0 and site["codes"] == k and site["empty_codes"] == 0
    code_map = dict(r.program.named_buffers())["head.vq_code_map"]
    assert code_map.shape == (vocab,) and 0 <= int(code_map.min()) and int(code_map.max()) < k   # total map


def test_pass_on_tiny_gpt_tied(tiny_gpt, tmp_path):
    model, args = tiny_gpt
    r = rewrite(model, args, passes="vq-logits{codes=128,iters=5}", verify=True)
    res = r.report.passes[0]
    gm = r.program.graph_module
    assert _ops(gm).count(OP) == 1
    assert aten.embedding.default in _ops(gm)
    assert "tok_emb.weight" in dict(r.program.named_parameters())     # tied table kept for the embedding
    s = res.sites[0]
    assert s["head_params_before"] == 256 * 64 and s["head_params_after"] == 128 * 64 + 2 * 256 and s["tied"]
    assert s["token_bias"] and "lm_head.vq_token_bias" in dict(r.program.named_parameters())
    assert 0 <= s["top1_agreement"] <= 1 and 0 <= s["top5_overlap"] <= 1
    assert "perplexity_before" in s and "perplexity_after" in s
    assert s["kl"] >= s["kl_floor"] - 1e-9 and s["kl_floor"] >= 0
    assert 0 < res.error_vs_original < 1.0
    assert res.flops_after < res.flops_before
    torch.export.save(r.program, tmp_path / "vq.pt2")
    out = r.module()(*args)
    assert torch.equal(torch.export.load(tmp_path / "vq.pt2").module()(*args), out)
    assert out.shape == (2, 16, 256)
    assert torch.equal(out.argmax(-1), out.softmax(-1).argmax(-1))   # consumers of logits keep working


@pytest.mark.parametrize("tail", ["log_softmax", "softmax"])
def test_log_softmax_fusion(tail):
    model = _LM(vocab=30, tail=tail).eval()
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    r = rewrite(model, (ids,), passes="vq-logits{codes=6,iters=3,log_softmax=true}", verify=True)
    gm = r.program.graph_module
    ops = _ops(gm)
    assert aten.log_softmax.int not in ops and aten.softmax.int not in ops
    node = next(n for n in gm.graph.nodes if n.target == OP)
    assert node.args[-1] is True
    assert r.report.passes[0].sites[0]["fused_log_softmax"]
    out = r.module()(ids)
    probs = out.exp() if tail == "log_softmax" else out
    assert torch.allclose(probs.sum(-1), torch.ones(2, 6), atol=1e-5)
    # same numbers as plain vq logits followed by the original consumer
    plain = rewrite(model, (ids,), passes="vq-logits{codes=6,iters=3}").module()(ids)
    assert torch.allclose(out, plain, atol=1e-5)


def test_log_softmax_not_fused_when_head_has_other_consumers():
    class Two(_LM):
        def forward(self, ids):
            z = self.head(torch.tanh(self.mix(self.emb(ids))))
            return torch.log_softmax(z, -1), z.argmax(-1)

    model = Two(vocab=30).eval()
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    r = rewrite(model, (ids,), passes="vq-logits{codes=6,log_softmax=true}")
    assert aten.log_softmax.int in _ops(r.program.graph_module)
    assert any("emitted plain logits" in m for m in r.report.passes[0].messages)


def test_codes_not_below_vocab_refused(tiny_gpt):
    model, args = tiny_gpt
    with pytest.raises(UserError) as e:
        rewrite(model, args, passes="vq-logits{codes=256}")
    assert "smaller than the vocabulary" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError):
        parse_pass("vq-logits{codes=0}")


def test_map_files(tmp_path):
    vocab, k = 24, 4
    rows = _repeated_rows(k, vocab, 8, 0)
    model = _LM(vocab=vocab, rows=rows).eval()
    ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    _, labels = kmeans.kmeans(rows, k, iters=2)
    good_json = tmp_path / "m.json"
    good_json.write_text(json.dumps(labels.tolist()))
    good_pt = tmp_path / "m.pt"
    torch.save(labels, good_pt)
    for path in (good_json, good_pt):
        r = rewrite(model, (ids,), passes=f"vq-logits{{map='{path}'}}", verify=True)
        assert r.report.passes[0].error_vs_original < 1e-5
        assert torch.equal(dict(r.program.named_buffers())["head.vq_code_map"].long(), labels)
    bad = {"short.json": json.dumps([0, 1]), "floats.json": json.dumps([0.5] * vocab),
           "garbage.json": "{not json", "neg.json": json.dumps([-1] + [0] * (vocab - 1)),
           "toomany.json": json.dumps(list(range(vocab)))}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    for name in list(bad) + ["missing.json"]:
        with pytest.raises(UserError) as e:
            rewrite(model, (ids,), passes=f"vq-logits{{map='{tmp_path / name}'}}")
        assert "\n" not in str(e.value) and "map" in str(e.value)


def test_reference_equals_op():
    g = torch.Generator().manual_seed(2)
    h, c, m = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g), torch.randint(0, 5, (11,), generator=g)
    assert torch.equal(op_mod.reference(h, c, m), OP(h, c, m))


def test_model_without_lm_head_is_skipped_with_a_reason():
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-bert")
    result = rewrite(model, args, "vq-logits{codes=16}")
    assert "no LM head" in result.report.passes[0].skipped


@settings(max_examples=20, deadline=None, derandomize=True)
@given(vocab=st.integers(8, 60), dim=st.integers(2, 12), k=st.integers(1, 7), offset=st.floats(0.0, 5.0),
       seed=st.integers(0, 2**16))
def test_token_bias_is_each_tokens_best_offset_and_the_error_says_what_is_left(vocab, dim, k, offset, seed):
    """With the head input's mean, fit_codebook adds β_v = μ·(W_v − C_M(v)): the per-token offset with the least
    mean-square logit error on the rows H and μ came from (the residual averages to 0 for every token), and
    logit_error then measures exactly what is left, Σ_v π_v·mean((x·Δ_v − β_v)²) relative to the logits' own."""
    from passes.vq_logits import fit_codebook, logit_error
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    x = torch.randn(200, dim, generator=g, dtype=torch.float64) + offset       # inputs with a mean, like an LM's
    h, mu = x.t() @ x / x.shape[0], x.mean(0)
    pi = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1
    codebook, code_map, beta = fit_codebook(w, h, pi, k, 3, 0, None, mu)
    assert beta is not None and beta.shape == (vocab,)
    residual = x @ (w - codebook[code_map]).t() - beta                        # (rows, V) logit errors
    assert residual.mean(0).abs().max() <= 1e-9 * (1 + float(residual.abs().max()))
    measured = float(((residual ** 2).mean(0) * pi).sum() / (((x @ w.t()) ** 2).mean(0) * pi).sum()) ** 0.5
    assert logit_error(w, codebook, code_map, h, pi, mu) == pytest.approx(measured, rel=1e-6, abs=1e-9)
    without = fit_codebook(w, h, pi, k, 3, 0, code_map, None)
    assert without[2] is None and torch.equal(without[1], code_map)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(rows=st.integers(1, 40), vocab=st.integers(2, 50), k=st.integers(1, 8), dim=st.integers(1, 6),
       scale=st.floats(0.1, 8.0), seed=st.integers(0, 2**16))
def test_map_kl_floor_bounds_every_codebook_and_bias_and_is_attained(rows, vocab, k, dim, scale, seed):
    """map_kl_floor is a floor: no codebook C, hidden states h and token bias β — the whole family the op computes,
    (h·Cᵀ)[M] + β — gets closer to the original logits in mean KL; and it is the minimum: the distribution that
    keeps each row's code probabilities and splits every code as the rows do on average reaches it."""
    from passes.vq_logits import kl_divergence, map_kl_floor
    g = torch.Generator().manual_seed(seed)
    k = min(k, vocab)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    code_map = torch.randint(0, k, (vocab,), generator=g)
    floor = map_kl_floor(logits, code_map, k, chunk=7)
    assert floor >= 0
    for _ in range(5):
        h = torch.randn(rows, dim, generator=g, dtype=torch.float64)
        codebook = torch.randn(k, dim, generator=g, dtype=torch.float64) * scale
        beta = torch.randn(vocab, generator=g, dtype=torch.float64) * scale
        assert kl_divergence(logits, (h @ codebook.t())[:, code_map] + beta) >= floor - 1e-9
    p = torch.softmax(logits, -1)
    per_row = torch.zeros(rows, k, dtype=torch.float64).index_add_(1, code_map, p)
    mass = p.sum(0)
    split = mass / torch.zeros(k, dtype=torch.float64).index_add_(0, code_map, mass)[code_map]
    best = torch.log(per_row[:, code_map]) + torch.log(split)
    assert kl_divergence(logits, best) == pytest.approx(floor, rel=1e-7, abs=1e-10)


def test_map_kl_floor_is_zero_when_the_map_loses_nothing():
    """Tokens of one code whose logits differ by a constant in every row are split in the same proportions
    everywhere: the map loses nothing, and the floor is 0; merging two tokens that trade places costs log 2 a row."""
    from passes.vq_logits import map_kl_floor
    g = torch.Generator().manual_seed(0)
    code_map = torch.tensor([0, 1, 0, 2, 1, 2])
    logits = torch.randn(9, 3, generator=g, dtype=torch.float64)[:, code_map] + torch.randn(6, generator=g,
                                                                                          dtype=torch.float64)
    assert map_kl_floor(logits, code_map, 3) == pytest.approx(0.0, abs=1e-12)
    swap = torch.tensor([[30.0, 0.0], [0.0, 30.0]], dtype=torch.float64)   # one token or the other, each certain
    assert map_kl_floor(swap, torch.tensor([0, 0]), 1) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)


def _mean_kl(ref: torch.Tensor, approx: torch.Tensor) -> float:
    lr, la = torch.log_softmax(ref.double(), -1), torch.log_softmax(approx.double(), -1)
    return float((lr.exp() * (lr - la)).sum(-1).mean())


def test_codebook_trained_to_the_logits_lowers_the_kl_on_held_out_ids():
    """fit_steps trains C and β to the original's next-token distribution on the calibration batches: the held-out
    batch's KL drops (the figures say so), and so does the KL of the whole program on ids it never saw — against
    the same closed-form fit without the training; the floor of the map stays below both."""
    g = torch.Generator().manual_seed(3)
    model = _LM(vocab=300, dim=16, rows=torch.randn(300, 16, generator=g) * 2, seed=3).eval()
    ids = torch.randint(0, 300, (4, 24), generator=g)
    held = torch.randint(0, 300, (4, 4, 24), generator=g)          # the program takes (4, 24): four batches
    spec = "vq-logits{codes=24,calibrate=16,seq=32,fit_steps=%d}"
    closed = rewrite(model, (ids,), passes=spec % 0)
    fitted = rewrite(model, (ids,), passes=spec % 80)
    site = fitted.report.passes[0].sites[0]
    assert "fit_kl_before" not in closed.report.passes[0].sites[0]
    assert site["fit_kept"] and site["fit_kl_after"] < 0.85 * site["fit_kl_before"]   # 0.72 measured
    with torch.no_grad():
        want = torch.cat([model(b) for b in held])
        kl_closed = _mean_kl(want, torch.cat([closed.module()(b) for b in held]))
        kl_fitted = _mean_kl(want, torch.cat([fitted.module()(b) for b in held]))
    assert kl_fitted < 0.95 * kl_closed                                    # 0.86 measured
    assert site["kl_floor"] <= site["kl"]
    names = dict(fitted.program.named_buffers())
    assert torch.equal(names["head.vq_code_map"], dict(closed.program.named_buffers())["head.vq_code_map"])


def test_fit_to_logits_is_undone_when_the_held_out_kl_does_not_drop():
    from passes.vq_logits import fit_to_logits
    g = torch.Generator().manual_seed(0)
    w, inputs = torch.randn(50, 6, generator=g), [torch.randn(40, 6, generator=g) for _ in range(3)]
    codebook, code_map, beta = torch.randn(5, 6, generator=g), torch.randint(0, 5, (50,), generator=g), torch.zeros(50)
    c, b, figures = fit_to_logits(w, None, codebook, code_map, beta, inputs, steps=5, lr=1e4)   # diverges
    assert not figures["fit_kept"] and c is codebook and b is beta
    assert figures["fit_kl_after"] == figures["fit_kl_before"]
    c, b, figures = fit_to_logits(w.bfloat16(), None, codebook.bfloat16(), code_map, beta.bfloat16(),
                                  [x.bfloat16() for x in inputs], steps=40, lr=1e-2)
    assert figures["fit_kept"] and c.dtype == b.dtype == torch.bfloat16


def test_fit_options_are_validated():
    for spec in ("vq-logits{fit_steps=-1}", "vq-logits{fit_lr=0}"):
        with pytest.raises(Exception, match="fit_"):
            parse_pass(spec)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(vocab=st.integers(12, 80), k=st.integers(2, 10), frequent=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_frequent_tokens_get_codes_of_their_own(vocab, k, frequent, seed):
    """fit_codebook(frequent=S): the S heaviest tokens each alone in a code (their logits exact up to the bias),
    every other token in one of the remaining k − S codes; with no more distinct rows than codes, plain k-means
    (which is exact there)."""
    from passes.vq_logits import fit_codebook
    frequent = min(frequent, k - 1)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, 5, generator=g, dtype=torch.float64)
    pi = torch.rand(vocab, generator=g, dtype=torch.float64)
    codebook, code_map, _ = fit_codebook(w, None, pi, k, 3, 0, None, None, frequent)
    heaviest = pi.argsort(descending=True)[:frequent]
    sizes = torch.bincount(code_map, minlength=k)
    assert bool((sizes[code_map[heaviest]] == 1).all()) and len(set(code_map[heaviest].tolist())) == frequent
    assert torch.allclose(codebook[code_map[heaviest]], w[heaviest])
    repeated = _repeated_rows(k, vocab, 5, seed).double()
    codebook, code_map, _ = fit_codebook(repeated, None, pi, k, 3, 0, None, None, frequent)
    assert torch.allclose(codebook[code_map], repeated)


def test_frequent_option_is_validated():
    for spec in ("vq-logits{frequent=-2}", "vq-logits{codes=8,frequent=8}"):
        with pytest.raises(Exception, match="frequent"):
            parse_pass(spec)
    parse_pass("vq-logits{codes=8,frequent=7}")
