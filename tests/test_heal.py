"""`heal`: distillation of the rewritten program from the original (passes/heal.py, rewriter/distill.py,
rewriter/trainable.py), on small models."""
from __future__ import annotations

import copy

import pytest
import torch

from rewriter import bcq, distill, rewrite, trainable
from rewriter.errors import UserError
from rewriter.ops import lowrank_linear, shiftadd_linear

FAST = "samples=16,seq=16,batch=4"


def _site(report, name="program"):
    heal = next(p for p in report.passes if p.name == "heal")
    return next(s for s in heal.sites if s["site"] == name), heal


def _healable(tiny_gpt):
    """The tiny GPT with its tied embedding scaled by 0.2: at N(0, 1) 'repeat the token' takes p ≈ 1, so its own
    samples repeat their first token and leave next to nothing to heal (held-out KL ~1e-8)."""
    model, args = tiny_gpt
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.tok_emb.weight.mul_(0.2)
    return model, args


def _ops(program):
    return [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("first", ["monarch{blocks=4,calibrate=8}", "lowrank{ratio=0.3,calibrate=8}",
                                   "blockdiag{calibrate=8}"])
def test_heal_lowers_the_held_out_loss(tiny_gpt, first):
    model, args = _healable(tiny_gpt)
    r = rewrite(model, args, passes=f"{first},heal{{mode=both,steps=30,lr=1e-3,{FAST}}}")
    s, heal = _site(r.report)
    assert s["loss"] == "kl"
    assert s["loss_after"] <= s["loss_after_layer"] <= s["loss_before"]
    assert s["loss_after"] < 0.95 * s["loss_before"], s         # measured: 0.83 (monarch), 0.55, 0.92
    assert any("held-out KL" in m for m in heal.messages)


def test_layer_stage_refits_only_where_the_layer_loss_drops(tiny_gpt):
    model, args = tiny_gpt
    r = rewrite(model, args, passes=f"shiftadd{{bits=2,group=32,calibrate=8}},heal{{mode=layer,{FAST}}}")
    s, heal = _site(r.report)
    layers = [x for x in heal.sites if x.get("stage") == "layer"]
    assert len(layers) == 12
    assert all(x["layer_loss_after"] <= x["layer_loss_before"] for x in layers)
    assert any(x["layer_loss_after"] < x["layer_loss_before"] for x in layers)
    assert s["loss_after"] <= s["loss_before"]


def test_layer_stage_holds_one_chunk_of_grams_at_a_time(tiny_gpt, monkeypatch):
    """Under a Gram budget smaller than one layer's, every layer is captured and refitted on its own, each through
    the layers refitted before it; the stage still refits every layer and never raises the held-out loss."""
    from rewriter import calibration, distill
    model, args = tiny_gpt
    captured = []
    real = distill.capture_pairs
    monkeypatch.setattr(distill, "capture_pairs", lambda t, s, pairs, *a: captured.append(pairs) or real(t, s, pairs, *a))
    monkeypatch.setattr(calibration, "GRAM_BUDGET", 1)
    r = rewrite(model, args, passes=f"shiftadd{{bits=2,group=32,calibrate=0}},heal{{mode=layer,{FAST}}}")
    s, heal = _site(r.report)
    assert [len(p) for p in captured] == [1] * 12
    layers = [x for x in heal.sites if x.get("stage") == "layer"]
    assert len(layers) == 12 and s["layers_refitted"] > 0
    assert s["loss_after"] <= s["loss_before"]


@pytest.mark.parametrize("calibrate", [0, 8])
def test_default_mode_refits_only_layers_fitted_without_data(tiny_gpt, calibrate):
    """mode=auto: the layer stage for layers their pass fitted data-free; calibrated ones go straight to training."""
    model, args = tiny_gpt
    r = rewrite(model, args, passes=f"shiftadd{{bits=2,group=32,calibrate={calibrate}}},heal{{steps=2,{FAST}}}")
    s, heal = _site(r.report)
    layers = [x for x in heal.sites if x.get("stage") == "layer"]
    if calibrate:
        assert not layers and "loss_after_layer" not in s and s["layers_fitted_by_their_pass"] == 12
        assert any("fitted to calibration data by their pass" in m for m in heal.messages)
    else:
        assert len(layers) == 12 and "layers_fitted_by_their_pass" not in s
        assert s["loss_after_layer"] <= s["loss_before"]
    assert s["loss_after"] <= s["loss_before"]


def test_heal_keeps_the_compact_form(tiny_gpt):
    model, args = tiny_gpt
    base = rewrite(model, args, passes="shiftadd{bits=3,group=32,calibrate=8}")
    r = rewrite(model, args, passes=f"shiftadd{{bits=3,group=32,calibrate=8}},heal{{steps=5,{FAST}}}")
    assert _ops(r.program).count(shiftadd_linear.OP) == 12 and lowrank_linear.OP not in _ops(r.program)
    assert set(r.program.state_dict) == set(base.program.state_dict)          # no α, no adapters left behind
    for name, t in r.program.state_dict.items():
        assert t.dtype == base.program.state_dict[name].dtype and t.shape == base.program.state_dict[name].shape
    # after softplus-attn: its per-head gains and biases train, with LoRA branches on the dense layers (merged
    # back: the program keeps its tensors)
    plain = rewrite(model, args, passes="softplus-attn{calibrate=4}")
    r = rewrite(model, args, passes=f"softplus-attn{{calibrate=4}},heal{{steps=5,lr=1e-2,{FAST}}}")
    s, _ = _site(r.report)
    head = [n for n in plain.program.state_dict if "softplus_attn" in n]
    assert s["lora_branches"] > 0 and len(head) == 4
    lora = rewrite(model, args, passes=f"softplus-attn{{calibrate=4}},heal{{steps=5,lr=1e-2,train=lora,{FAST}}}")
    assert s["trained_parameters"] - _site(lora.report)[0]["trained_parameters"] == \
        sum(plain.program.state_dict[n].numel() for n in head)          # LoRA and the gains and biases
    assert lowrank_linear.OP not in _ops(r.program)
    assert set(r.program.state_dict) == set(plain.program.state_dict)


@pytest.mark.parametrize("code,lr", [("affine", None), ("affine,scale_bits=0", None), ("pow2", "1e-3")])
def test_heal_trains_the_shiftadd_scales_and_keeps_the_signs(tiny_gpt, code, lr):
    """affine: the scales and offsets train (fp32 copies; coded ones through their codes' rounding, then coded
    again; fp16 ones rounded back) at the default lr, which heal scales down for them (they are a grid step);
    pow2: the α behind the exponents."""
    model, args = _healable(tiny_gpt)
    spec = f"shiftadd{{bits=3,group=32,calibrate=8,code={code}}}"
    base = rewrite(model, args, passes=spec).program.state_dict
    r = rewrite(model, args, passes=f"{spec},heal{{mode=e2e,steps=30,{f'lr={lr},' if lr else ''}{FAST}}}")
    s, _ = _site(r.report)
    assert s["loss_after"] < s["loss_before"], s
    healed = r.program.state_dict
    trained = {"affine": ("bcq_scales_codes", "bcq_offsets_codes"), "affine,scale_bits=0": ("bcq_scales", "bcq_offsets"),
               "pow2": ("bcq_exponents",)}[code]
    for name, t in healed.items():
        if name.endswith("bcq_signs"):
            assert torch.equal(t, base[name])
    changed = [n for n in healed if n.endswith(trained) and not torch.equal(healed[n], base[n])]
    assert changed, "no scale moved"
    if code != "pow2":
        stored = torch.uint8 if code == "affine" else torch.float16
        assert all(healed[n].dtype == stored for n in changed)
    assert set(healed) == set(base) and all(healed[n].shape == base[n].shape for n in base)


def test_lr_scales_give_each_tensor_its_own_learning_rate():
    """distill.train(lr_scales=…): one AdamW step moves each element by about lr·scale (Adam's first step is
    lr·sign(gradient)), whatever the gradient's size."""
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    forward = lambda batch: torch.cat([a * 1e3, b * 1e-3])[None]         # noqa: E731 — very different gradients
    distill.train(forward, lambda batch: torch.ones(1, 6), [a, b], [[None]], steps=1, lr=0.1, loss="mse",
                  clip=0.0, lr_scales=[1.0, 0.01])
    assert torch.allclose(a.detach(), torch.full((3,), 0.1), rtol=1e-3)
    assert torch.allclose(b.detach(), torch.full((3,), 0.001), rtol=1e-3)


@pytest.mark.parametrize("budget, kept", [(0, 0), (2 * 8 * 4, 2), (3 * 8 * 4, 3), (10**9, 3)])
def test_teacher_outputs_are_cached_within_the_budget_and_training_is_unchanged(budget, kept):
    """distill.train(cache_bytes=…): the teacher runs once per batch it can keep (three batches of 2×4 floats,
    cycled over 7 steps), and the trained values and losses are those of recomputing it every time."""
    torch.manual_seed(0)
    w0, batches = torch.randn(4, 4), [[torch.randn(2, 4)] for _ in range(3)]
    teacher_w = torch.randn(4, 4)

    def run(cache_bytes):
        w, calls = w0.clone().requires_grad_(True), []

        def teacher(batch):
            calls.append(1)
            return batch[0] @ teacher_w
        history = distill.train(lambda batch: batch[0] @ w, teacher, [w], batches, steps=7, lr=0.05, loss="mse",
                                cache_bytes=cache_bytes)
        return w.detach(), history, len(calls)

    w_plain, h_plain, calls_plain = run(0)
    w_cached, h_cached, calls_cached = run(budget)
    assert torch.equal(w_plain, w_cached) and h_plain == h_cached
    # steps 0..6 visit batches 0, 1, 2, then 0, 1, 2, 0 again: a repeat of one of the first `kept` is free
    assert calls_plain == 7 and calls_cached == 3 + sum(1 for b in (0, 1, 2, 0) if b >= kept)


def test_heal_with_the_teacher_cache_equals_heal_without(tiny_gpt, monkeypatch):
    model, args = tiny_gpt
    spec = f"monarch{{calibrate=8}},heal{{steps=6,{FAST}}}"
    cached = rewrite(model, args, passes=spec).program.state_dict
    monkeypatch.setenv("REWRITE_TEACHER_CACHE_BYTES", "0")
    plain = rewrite(model, args, passes=spec).program.state_dict
    assert cached.keys() == plain.keys() and all(torch.equal(cached[k], plain[k]) for k in cached)
    monkeypatch.setenv("REWRITE_TEACHER_CACHE_BYTES", "lots")
    with pytest.raises(UserError, match="REWRITE_TEACHER_CACHE_BYTES"):
        rewrite(model, args, passes=spec)


def test_adapters_beside_binary_weights_are_kept(tiny_gpt):
    model, args = tiny_gpt
    r = rewrite(model, args, passes=f"shiftadd{{bits=2,group=32,calibrate=8}},heal{{steps=20,lr=1e-3,adapters=true,"
                                    f"rank=4,mode=e2e,{FAST}}}")
    s, _ = _site(r.report)
    if s["loss_after"] < s["loss_before"]:
        assert _ops(r.program).count(lowrank_linear.OP) == 12
        assert any(k.endswith("heal_lora_u") for k in r.program.state_dict)
    out = r.module()(*args)
    assert out.shape == (2, 16, 256) and torch.isfinite(out).all()


def test_heal_is_deterministic(tiny_gpt):
    model, args = tiny_gpt
    spec = f"monarch{{calibrate=8}},heal{{steps=5,{FAST}}}"
    a, b = rewrite(model, args, passes=spec).program.state_dict, rewrite(model, args, passes=spec).program.state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_that_hurts_is_undone(tiny_gpt):
    model, args = tiny_gpt
    base = rewrite(model, args, passes="monarch{calibrate=8}")
    r = rewrite(model, args, passes=f"monarch{{calibrate=8}},heal{{mode=e2e,steps=3,lr=1000,{FAST}}}")
    s, heal = _site(r.report)
    assert s["loss_after"] == s["loss_before"]
    assert any("undone" in m for m in heal.messages)
    for k, v in base.program.state_dict.items():
        assert torch.equal(v, r.program.state_dict[k]), k


def test_non_lm_outputs_use_normalised_mse():
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-vit")
    r = rewrite(model, args, passes="lowrank{ratio=0.3,calibrate=8},heal{steps=10,lr=1e-3,samples=8}")
    s, _ = _site(r.report)
    assert s["loss"] == "mse" and s["loss_after"] <= s["loss_before"]


def test_straight_through_scales_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    q = bcq.quantize(w, 2, 16)
    alpha = bcq.exp_values(q.exponents).clone().requires_grad_(True)
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    y = trainable.scaled_signs_linear(x, alpha, q.signs, None, 32, 16, 1)
    assert torch.allclose(y, x @ q.dequantize().t(), atol=1e-5)
    y.square().sum().backward()
    # reference: the same weight built from α with plain autograd (snapping is the identity on these values)
    a2 = alpha.detach().clone().requires_grad_(True)
    planes = bcq.unpack_signs(q.signs).view(2, 6, 2, 16)
    w2 = (planes * a2.permute(2, 0, 1)[..., None]).sum(0).reshape(6, 32)
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w2.t()).square().sum().backward()
    assert torch.allclose(alpha.grad, a2.grad, atol=1e-4) and torch.allclose(x.grad, x2.grad, atol=1e-4)


@pytest.mark.parametrize("scale_bits,exponents", [(0, None), (6, None), (6, (0, 1, 3))])
def test_affine_training_form_from_cached_levels_is_the_unpacked_one(scale_bits, exponents):
    """The training form reads levels Σ 2^e·B computed once instead of unpacking the signs at every call: same
    outputs and gradients, bit for bit (float16 where it holds the levels exactly, else float32)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 40, generator=g)
    q = bcq.quantize_affine(w, bits=3, group=8, scale_bits=scale_bits)
    exps = q.exponents if exponents is None else torch.tensor(exponents, dtype=torch.int8).view(1, 1, 3, 1)
    levels = trainable.affine_levels(q.signs, exps, 8)
    assert levels.dtype == torch.float16 and levels.shape == (10, 40)
    x = torch.randn(4, 40, generator=g)
    outs = []
    for cached in (None, levels, levels.float()):
        s, o = q.scales.float().clone().requires_grad_(True), q.offsets.float().clone().requires_grad_(True)
        y = trainable.affine_signs_linear(x, q.signs, exps, None, 40, 8, s, o, scale_bits, torch.float16, cached)
        y.square().sum().backward()
        outs.append((y, s.grad, o.grad))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
    far = torch.tensor((0, 6, 13), dtype=torch.int8).view(1, 1, 3, 1)      # 1 + 2^6 + 2^13 needs 14 bits
    wide = trainable.affine_levels(q.signs, far, 8)
    assert wide.dtype == torch.float32 and torch.equal(wide, bcq.dequantize(q.signs, far, 40, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opened_shiftadd_layers_read_cached_levels_and_closing_leaves_the_program_as_it_was(tiny_gpt, dtype):
    """open_shiftadd gives each affine layer its levels buffer (read by the training form, same output as the packed
    op); close_shiftadd drops it again: same tensors, same output, nothing left behind — fp32 and bf16 models."""
    model, args = tiny_gpt
    model = copy.deepcopy(model).to(dtype)
    gm = rewrite(model, args, passes="shiftadd{bits=3,group=32,calibrate=8}").program.module()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    want = gm(*args)
    layers = [layer for layer in trainable.find_layers(gm) if layer.kind == "shiftadd"]
    assert layers and all(layer.affine for layer in layers)
    for layer in layers:
        trainable.open_shiftadd(gm, layer)
        levels = dict(gm.named_buffers())[layer.tensors["levels"]]
        assert levels.dtype == torch.float16 and layer.node.args[-1].target == layer.tensors["levels"]
    assert torch.equal(gm(*args), want)
    names = [layer.tensors["levels"] for layer in layers]
    for layer in layers:
        trainable.close_shiftadd(gm, layer)
    assert not any(n in dict(gm.named_buffers()) for n in names)
    after = gm.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(gm(*args), want)


def test_corrected_target_solves_the_layer_least_squares():
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(300, 8, generator=g, dtype=torch.float64)
    xs = xt + 0.3 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    grams = {"ss": xs.t() @ xs / 300, "ts": xt.t() @ xs / 300, "tt": xt.t() @ xt / 300}
    target = distill.corrected_target(w, grams["ts"], grams["ss"], damp=0.0)
    want = torch.linalg.lstsq(xs, xt @ w.t()).solution.t()
    assert torch.allclose(target, want, atol=1e-8)
    direct = ((xt @ w.t() - xs @ target.t()).square().sum() / (xt @ w.t()).square().sum()).item()
    assert distill.layer_loss(w, target, grams) == pytest.approx(direct, rel=1e-6)
    assert distill.layer_loss(w, target, grams) < distill.layer_loss(w, w, grams)


def test_lr_schedule():
    lrs = [distill.lr_at(i, 100, 1.0) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))


def test_bad_options_and_cli(tmp_path, capsys):
    from rewriter.cli import main
    from rewriter.pass_base import parse_pass
    for spec in ("heal{steps=-1}", "heal{mode=fast}", "heal{lr=0}", "heal{rank=0}", "heal{data=x.csv}"):
        with pytest.raises(UserError) as e:
            parse_pass(spec)
        assert "\n" not in str(e.value)
    code = main(["demo:tiny-gpt", "--pass", f"monarch{{calibrate=4}},heal{{steps=2,{FAST}}}", "--verify", "-q",
                 "-o", str(tmp_path / "h.pt2")])
    assert code == 0 and (tmp_path / "h.pt2").exists()
    assert "heal" in capsys.readouterr().out


class _IntOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)

    def forward(self, x):
        return self.a(x).argmax(-1)


def test_heal_declines_a_program_without_a_float_output():
    r = rewrite(_IntOut(), (torch.randn(2, 5, 16),), passes="monarch{calibrate=2},heal{steps=2,samples=4}")
    heal = r.report.passes[1]
    assert heal.skipped and "floating-point" in heal.skipped


class _Tup(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h)), h.sum(-1)


class _TwoIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, y):
        return self.b(torch.relu(self.a(x))) * y


@pytest.mark.parametrize("spec", ["lowrank", "monarch", "blockdiag", "structured", "shiftadd", "vq-logits", "heal",
                                  "shiftadd,heal"])
def test_small_odd_models_are_rewritten_or_declined_never_crash(spec):
    """Each pass with its fuzz options on models with tuple outputs, two inputs, no LM head: a result or a
    one-line UserError, never an internal error."""
    from rewriter.pass_base import registry
    parts = []
    for name in spec.split(","):
        opts = dict(registry()[name].fuzz_options)
        if name == "shiftadd":
            opts["group"] = 8
        parts.append(f"{name}{{{','.join(f'{k}={v}' for k, v in opts.items())}}}")
    torch.manual_seed(0)
    for model, args in [(_Tup(), (torch.randn(3, 16),)), (_TwoIn(), (torch.randn(4, 8), torch.randn(4, 8)))]:
        try:
            r = rewrite(model, args, passes=",".join(parts), verify=True)
        except UserError as e:
            assert "\n" not in str(e)
            continue
        out = r.module()(*args)
        assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))


def test_undo_keeps_tied_weights_tied():
    """An undone stage restores the snapshot: one tensor bound under two names (a tied embedding and LM head)
    must come back as one tensor, not two copies (that doubled SmolLM2's head parameters after an undo)."""
    from torch import fx

    from passes.heal import _own, _restore, _snapshot

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    gm = fx.symbolic_trace(Tied())
    snap = _snapshot(gm)
    original = gm.embed.weight
    before = original.detach().clone()
    _own(gm, ["head.weight"])                          # training takes its own copy, tied under both names
    assert gm.head.weight is gm.embed.weight and gm.embed.weight is not original
    with torch.no_grad():
        gm.embed.weight.add_(1.0)                       # training moved it
    assert torch.equal(original, before)               # the tensor it was captured with did not move
    _restore(gm, snap)
    assert gm.head.weight is gm.embed.weight
    assert torch.equal(gm.embed.weight, before)
    assert len(list(gm.parameters())) == 1


def test_output_independent_of_trained_parameters_trains_nothing_and_says_so():
    """heal's loss is taken on the first output; when no trained parameter reaches it, the end-to-end stage ends
    with a message (it was an autograd crash: exit 3)."""
    class SideLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x * 2, self.lin(x)

    r = rewrite(SideLinear(), (torch.randn(3, 4),), "heal{steps=2,samples=4,seq=8,batch=2}")
    heal = next(p for p in r.report.passes if p.name == "heal")
    assert any("nothing trained end to end" in m for m in heal.messages), heal.messages


def test_vectors_also_trains_the_programs_own_norms_and_biases(tiny_gpt):
    model, args = tiny_gpt
    spec = "shiftadd{{bits=2,group=32,calibrate=8}},heal{{steps=3,lr=1e-3,vectors={},{}}}"
    plain = rewrite(model, args, passes=spec.format("false", FAST))
    more = rewrite(model, args, passes=spec.format("true", FAST))
    vectors = {n: p for n, p in plain.program.named_parameters() if p.dim() == 1}
    assert vectors and _site(more.report)[0]["trained_parameters"] == \
        _site(plain.report)[0]["trained_parameters"] + sum(p.numel() for p in vectors.values())
    after = dict(more.program.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in vectors.items())      # they moved
    assert set(after) == set(dict(plain.program.named_parameters()))        # nothing added


@pytest.mark.parametrize("first,options", [("monarch{blocks=4,calibrate=4}", "train=all"),
                                           ("monarch{blocks=4,calibrate=4}", "vectors=true"),
                                           ("monarch{blocks=4,calibrate=4}", "mode=both"),
                                           ("softplus-attn", "train=lora")])
def test_heal_never_writes_into_the_callers_model(first, options):
    """The program shares its tensors with the model it was captured from; training writes into copies."""
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    r = rewrite(model, args, passes=f"{first},heal{{steps=3,lr=1e-2,{options},{FAST}}}")
    assert _site(r.report)[0]["trained_parameters"] > 0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_overfit_hint_only_when_batches_were_revisited_and_fit_far_better_than_the_held_out_one():
    from passes.heal import overfit_hint
    assert "overfit" in overfit_hint(0.119, 0.365, 15, 100)           # SmolLM2 structured 0.8, 64 samples
    assert overfit_hint(0.399, 0.347, 127, 100) == ""                 # 512 samples: each batch seen once
    assert overfit_hint(0.01, 0.365, 127, 100) == ""                  # never revisited: not overfitting
    assert overfit_hint(0.3, 0.365, 15, 100) == ""                    # revisited, but no gap
    assert overfit_hint(None, 0.365, 15, 100) == ""                   # nothing trained


def test_heal_says_when_it_overfits_its_samples(tiny_gpt):
    model, args = _healable(tiny_gpt)
    r = rewrite(model, args, passes="lowrank{ratio=0.3,calibrate=8},heal{mode=e2e,steps=60,lr=1e-2,samples=4,"
                                    "seq=16,batch=2}")                # one training batch, one held out
    s, heal = _site(r.report)
    assert s["train_loss_end"] < 0.5 * s["loss_after"], s      # measured: 0.09 of it
    assert s.get("overfit") and any("are overfit" in m for m in heal.messages), heal.messages
