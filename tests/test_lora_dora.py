"""DoRA (lora{dora=true}): PEFT-compatible magnitudes — load, save, merge like PEFT, unmerge bit-exactly, train."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter import rewrite
from rewriter.peft_interop import write_adapter
from rewriter.verify import exact_agreement, run_graph_float64
from tests.helpers import LinearStack
from tests.lora_peft_helpers import Net, peft_model, save_each

peft = pytest.importorskip("peft")
DORA = {"d": dict(r=3, lora_alpha=6, target_modules=["fc1", "fc2", "out"], use_dora=True)}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(0)
    base = Net().eval()
    model = peft_model(base, DORA)
    folder = save_each(model, tmp_path_factory.mktemp("dora"))["d"]
    x = torch.randn(5, 12)
    return base, model, folder, rewrite(base, (x,), f"lora{{adapter='{folder}'}}"), x


def test_loaded_dora_adapter_matches_peft(loaded):
    base, model, folder, result, x = loaded
    assert all(s["dora"] for s in result.report.passes[0].sites)
    assert result.report.passes[0].contract == "semantic"     # loading changes the function on purpose
    with torch.no_grad():
        torch.testing.assert_close(result.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_saved_dora_adapter_loads_in_peft(loaded, tmp_path):
    base, model, folder, result, x = loaded
    assert write_adapter(result.program.module(), str(tmp_path / "out")) == 3
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    assert again.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


def test_merge_matches_peft_merge_and_unload(loaded):
    base, model, folder, result, x = loaded
    merged = rewrite(result.program, (x,), "lora-merge{unload=true}", verify=True)
    peft_merged = copy.deepcopy(model).merge_and_unload()
    ours = merged.program.state_dict
    for name, p in peft_merged.state_dict().items():
        torch.testing.assert_close(ours[name], p, rtol=1e-6, atol=1e-6)
    assert set(ours) == set(base.state_dict())


def test_insertion_is_exact_and_magnitude_is_the_row_norm():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 12)
    result = rewrite(model, (x,), "lora{dora=true,rank=2}", verify=True)
    assert result.report.passes[0].contract == "exact" and result.report.passes[0].error_vs_previous <= 1e-6
    torch.testing.assert_close(result.program.state_dict["fc1.lora_magnitude"], model.fc1.weight.norm(dim=1))


@st.composite
def dora_stacks(draw):
    depth = draw(st.integers(1, 2))
    dims = draw(st.lists(st.integers(1, 24), min_size=depth + 1, max_size=depth + 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    torch.manual_seed(draw(st.integers(0, 999)))
    model = LinearStack(dims, draw(st.lists(st.booleans(), min_size=depth, max_size=depth))).to(dtype)
    return model, torch.randn(draw(st.integers(1, 3)), dims[0]).to(dtype), draw(st.integers(1, 4)), \
        draw(st.integers(0, 999)), draw(st.booleans())


@settings(max_examples=15)
@given(dora_stacks())
def test_merge_keeps_the_function_and_unmerge_is_bit_exact(case):
    model, x, rank, seed, second = case
    spec = f"lora{{dora=true,rank={rank},init=gaussian,seed={seed}}}"
    if second:                                # a plain adapter beside it, merged in the same fold
        spec += f",lora{{name=p,rank={rank},init=gaussian,seed={seed + 1}}}"
    inserted = rewrite(model, (x,), spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in inserted.program.state_dict.items():
            if "lora_B" in name:
                t.copy_((torch.randn(t.shape, generator=gen) * 0.2).to(t.dtype))
            elif "lora_magnitude" in name:
                t.mul_((1 + 0.3 * torch.rand(t.shape, generator=gen)).to(t.dtype))
        expected = inserted.module()(x)
    truth = run_graph_float64(inserted.program.module(), [x])
    before = {k: v.clone() for k, v in inserted.program.state_dict.items()}
    merged = rewrite(inserted.program, (x,), "lora-merge")
    with torch.no_grad():
        got = merged.module()(x)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[x.dtype]
    assert exact_agreement([expected], [got], truth, tol)[0]
    back = rewrite(merged.program, (x,), "lora-unmerge").program.state_dict
    assert set(back) == set(before)
    for name, value in before.items():
        assert torch.equal(back[name].view(torch.uint8), value.view(torch.uint8)), name
    assert all(back[n].requires_grad for n in back if "lora_" in n)


def test_training_moves_magnitude_and_adapters():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(8, 12)
    module = rewrite(model, (x,), "lora{dora=true,rank=2,init=gaussian}").module()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[1] for n in trainable} == {"lora_A", "lora_B", "lora_magnitude"}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    target = torch.randn(8, 6)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(module(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9
    assert not torch.equal(module.fc1.lora_magnitude, model.fc1.weight.norm(dim=1))


def test_dora_program_round_trips_through_pt2(loaded, tmp_path):
    base, model, folder, result, x = loaded
    path = tmp_path / "dora.pt2"
    result.save(str(path))
    again = torch.export.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(again.module()(x), model(x), rtol=1e-5, atol=1e-5)
    merged = rewrite(str(path), None, "lora-merge,lora-unmerge")
    for name, value in result.program.state_dict.items():
        assert torch.equal(merged.program.state_dict[name], value), name
