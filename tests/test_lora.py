"""LoRA insert / merge / unmerge: exactness, bit-exact unmerge, layouts, training."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rewriter import UserError, rewrite
from rewriter.verify import exact_agreement, relative_error, run_graph_float64
from tests.helpers import LinearStack, randomize_adapters

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@st.composite
def linear_stacks(draw):
    depth = draw(st.integers(1, 3))
    dims = draw(st.lists(st.integers(1, 64), min_size=depth + 1, max_size=depth + 1))
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = LinearStack(dims, biases).to(dtype)
    x = torch.randn(draw(st.integers(1, 4)), dims[0]).to(dtype)
    return model, x, rank, seed


def _lora_ops(program):
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and "lora_linear" in str(n.target))


@given(linear_stacks())
def test_insert_then_merge_keeps_the_function(case):
    model, x, rank, seed = case
    inserted = rewrite(model, (x,), f"lora{{rank={rank},init=gaussian,seed={seed}}}", verify=True)
    assert _lora_ops(inserted.program) == len(model.layers)
    randomize_adapters(inserted.program, seed)           # as after training: the adapter now matters
    with torch.no_grad():
        expected = inserted.module()(x)
    truth = run_graph_float64(inserted.program.module(), [x])   # x·W and x·ΔW may cancel: judge against fp64
    merged = rewrite(inserted.program, (x,), "lora-merge", verify=True)
    assert _lora_ops(merged.program) == 0
    with torch.no_grad():
        got = merged.module()(x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert exact_agreement([expected], [got], truth, TOL[x.dtype])[0]


@given(linear_stacks())
def test_merge_then_unmerge_restores_weights_bit_exactly(case):
    model, x, rank, seed = case
    inserted = rewrite(model, (x,), f"lora{{rank={rank},alpha=32,init=gaussian,seed={seed}}}")
    randomize_adapters(inserted.program, seed, scale=1.0)
    before = {k: v.clone() for k, v in inserted.program.state_dict.items()}
    round_trip = rewrite(inserted.program, (x,), "lora-merge,lora-unmerge")
    after = round_trip.program.state_dict
    assert set(after) == set(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype
        assert torch.equal(after[name].view(torch.uint8) if value.dtype.is_floating_point else after[name],
                           value.view(torch.uint8) if value.dtype.is_floating_point else value), name
    assert _lora_ops(round_trip.program) == len(model.layers)
    assert all(after[n].requires_grad for n in after if n.endswith((".lora_A", ".lora_B")))


def test_naive_unmerge_would_drift_in_bf16():
    """The reason the correction exists: W + ΔW − ΔW in bf16 is not W (PEFT #1388)."""
    from rewriter.adapters import delta, merge_weight, unmerge_weight
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen).bfloat16()
    a, b = torch.randn(8, 64, generator=gen) * 0.1, torch.randn(64, 8, generator=gen) * 0.1
    d = delta(a, b, 2.0)
    merged, correction = merge_weight(w, d)
    naive = (merged.double() - d).bfloat16()
    assert not torch.equal(naive, w)
    assert torch.equal(unmerge_weight(merged, d, correction).view(torch.int16), w.view(torch.int16))
    assert correction.dtype == torch.int8  # 1 byte per weight when ΔW is small next to W


@given(st.sampled_from(DTYPES), st.floats(1e-3, 1e3), st.integers(0, 1000))
def test_unmerge_is_bit_exact_for_any_delta_scale(dtype, scale, seed):
    from rewriter.adapters import delta, merge_weight, unmerge_weight
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 16, generator=gen).to(dtype)
    w[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30]).to(dtype)  # zeros of both signs, subnormal-ish
    d = delta(torch.randn(4, 16, generator=gen), torch.randn(16, 4, generator=gen), scale)
    merged, correction = merge_weight(w, d)
    assert merged.dtype == dtype
    restored = unmerge_weight(merged, d, correction)
    assert torch.equal(restored.view(torch.uint8), w.view(torch.uint8))


def test_pissa_moves_principal_part_and_keeps_function(tiny_gpt):
    model, args = tiny_gpt
    result = rewrite(model, args, "lora{rank=4,init=pissa}", verify=True)
    sd = result.program.state_dict
    w0 = model.blocks[0].attn.q.weight.detach()
    residual = sd["blocks.0.attn.q.weight"]
    a, b = sd["blocks.0.attn.q.lora_A"], sd["blocks.0.attn.q.lora_B"]
    scale = 16.0 / 4
    torch.testing.assert_close(residual + scale * b @ a, w0, atol=1e-5, rtol=1e-5)
    # the principal part moved: the residual has the top-4 singular directions removed
    s_res = torch.linalg.svdvals(residual)
    s_w = torch.linalg.svdvals(w0)
    assert s_res[0] < s_w[0] and torch.allclose(s_res[0], s_w[4], rtol=1e-3)
    assert result.report.passes[0].error_vs_previous <= 1e-5


def test_default_targets_skip_the_tied_lm_head(tiny_gpt):
    model, args = tiny_gpt
    result = rewrite(model, args, "lora")
    names = [s["site"] for s in result.report.passes[0].sites]
    assert "lm_head" not in names and len(names) == 12


def test_targets_regex_and_no_match_error(tiny_gpt):
    model, args = tiny_gpt
    result = rewrite(model, args, r"lora{targets='attn\.(q|v)$'}")
    assert [s["site"] for s in result.report.passes[0].sites] == [
        "blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    with pytest.raises(UserError, match="no linear layer matches"):
        rewrite(model, args, "lora{targets=nothing_here}")


def test_merge_without_adapters_is_a_noop_with_message(tiny_gpt):
    model, args = tiny_gpt
    result = rewrite(model, args, "lora-merge")
    assert result.report.passes[0].skipped and "lora_linear" in result.report.passes[0].skipped
    merged = rewrite(rewrite(model, args, "lora,lora-merge").program, None, "lora-merge")
    assert merged.report.passes[0].skipped == "already merged: nothing to merge"


def _gpt2(n_layer=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids, use_cache=False).logits

    return Logits(model), (torch.randint(0, 64, (2, 8)),)


def test_gpt2_conv1d_addmm_layout():
    model, args = _gpt2()
    inserted = rewrite(model, args, "lora{rank=4,init=gaussian}", verify=True)
    sites = inserted.report.passes[0].sites
    assert len(sites) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer; the tied head is skipped
    randomize_adapters(inserted.program)
    with torch.no_grad():
        expected = inserted.module()(*args)
    merged = rewrite(inserted.program, args, "lora-merge", verify=True)
    ops = [str(n.target) for n in merged.program.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.addmm.default") == 8  # GPT-2's (in, out) addmm form restored
    with torch.no_grad():
        assert relative_error([expected], [merged.module()(*args)]) < 1e-5
    unmerged = rewrite(merged.program, args, "lora-unmerge")
    for name, value in inserted.program.state_dict.items():
        assert torch.equal(unmerged.program.state_dict[name], value), name


def test_finetuning_adapters_lowers_loss_and_keeps_base(tiny_gpt):
    model, (ids,) = tiny_gpt
    result = rewrite(model, (ids,), "lora{rank=4,alpha=8}")
    module = result.module()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    targets = torch.roll(ids, -1, dims=1)
    losses = []
    for _ in range(15):
        logits = module(ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9
    for n, p in module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_dropout_is_applied_to_the_adapter_input_only(tiny_gpt):
    model, args = tiny_gpt
    result = rewrite(model, args, "lora{rank=4,dropout=0.5}")
    ops = [str(n.target) for n in result.program.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.dropout.default") == 12
    merged = rewrite(result.program, args, "lora-merge")
    assert not any("dropout" in str(n.target) for n in merged.program.graph.nodes)
    unmerged = rewrite(merged.program, args, "lora-unmerge")
    assert sum("dropout" in str(n.target) for n in unmerged.program.graph.nodes) == 12


def test_lora_op_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w, b, a, bb, xa = make(2, 3, 5), make(4, 5), make(4), make(2, 5), make(4, 2), make(2, 3, 5)
    op = torch.ops.rewrite.lora_linear
    assert torch.autograd.gradcheck(lambda *t: op(*t, 0.7), (x, w, b, a, bb))
    assert torch.autograd.gradcheck(lambda x, w, a, bb, xa: op(x, w, None, a, bb, 0.7, xa), (x, w, a, bb, xa))


def test_saved_program_loads_and_trains_in_a_fresh_process(tmp_path, tiny_gpt):
    import subprocess
    import sys
    model, args = tiny_gpt
    path = tmp_path / "lora.pt2"
    rewrite(model, args, "lora{rank=4}").save(str(path))
    code = (
        "import torch, rewriter\n"
        f"ep = torch.export.load({str(path)!r})\n"
        "m = ep.module(); ids = ep.example_inputs[0][0]\n"
        "params = [p for n, p in m.named_parameters() if p.requires_grad]\n"
        "assert len(params) == 24, len(params)\n"
        "loss = m(ids).logsumexp(-1).mean(); loss.backward()\n"
        "assert all(p.grad is not None for p in params)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
