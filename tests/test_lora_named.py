"""Named adapters: several per layer, chosen by a pass or at run time (no re-export), weighted, hot-swapped, saved
per name — checked against PEFT running the same adapters."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter import UserError, rewrite
from rewriter.cli import main
from rewriter.lora_runtime import adapter_index, adapter_table, hotswap, set_adapter_index, set_adapters
from tests.helpers import LinearStack
from tests.lora_peft_helpers import Net, peft_model, save_each, set_active

peft = pytest.importorskip("peft")

ADAPTERS = {"u": dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "out"]),
            "v": dict(r=4, lora_alpha=6, target_modules=["fc1", "out"], use_dora=True),
            "w": dict(r=3, lora_alpha=3, target_modules=["fc2", "out"], use_rslora=True)}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """(base model, PEFT model with u, v (DoRA), w (rsLoRA), their folders, our program holding all three)."""
    torch.manual_seed(0)
    base = Net().eval()
    model = peft_model(base, ADAPTERS)
    folders = save_each(model, tmp_path_factory.mktemp("adapters"))
    x = torch.randn(5, 12)
    spec = ",".join(f"lora{{adapter='{folders[n]}',name={n}}}" for n in ADAPTERS)
    result = rewrite(base, (x,), spec)
    return base, model, folders, result, x


@pytest.mark.parametrize("selection", [["u"], ["v"], ["w"], ["u", "w"], ["u", "v", "w"], ["w", "v"], []])
def test_selections_match_peft(three, selection):
    base, model, _, result, x = three
    set_adapters(result.program, selection)
    with torch.no_grad():
        ours = result.module()(x)
        if selection:
            set_active(model, sorted(selection, key=list(ADAPTERS).index))   # our layers apply them in insertion order
            theirs = model(x)
        else:
            with model.disable_adapter():
                theirs = model(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_layers_hold_only_their_adapters(three):
    *_, result, _ = three
    table = adapter_table(result.program)
    assert {n: row["layers"] for n, row in table.items()} == {"u": 3, "v": 2, "w": 2}
    ops = [n for n in result.program.graph.nodes if n.op == "call_function" and "multi_lora_linear" in str(n.target)]
    assert len(ops) == 3 and sorted(n.args[7] for n in ops) == ["u,v", "u,v,w", "u,w"]
    assert all(p.requires_grad == ("lora_" in n) for n, p in result.module().named_parameters())


@st.composite
def stacks_with_adapters(draw):
    depth = draw(st.integers(1, 2))
    dims = draw(st.lists(st.integers(2, 24), min_size=depth + 1, max_size=depth + 1))
    torch.manual_seed(draw(st.integers(0, 1000)))
    model = LinearStack(dims, draw(st.lists(st.booleans(), min_size=depth, max_size=depth)))
    names = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=3, unique=True))
    specs = [f"lora{{name={n},rank={draw(st.integers(1, 4))},init=gaussian,seed={i},"
             f"dora={str(draw(st.booleans())).lower()}}}" for i, n in enumerate(names)]
    weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -0.7]), min_size=len(names), max_size=len(names)))
    return model, torch.randn(draw(st.integers(1, 4)), dims[0]), specs, names, weights


def _randomize(program, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in program.state_dict.items():
            if "lora_B" in name:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
            elif "lora_magnitude" in name:
                t.mul_(1 + 0.3 * torch.rand(t.shape, generator=gen))


@settings(max_examples=12)
@given(stacks_with_adapters())
def test_select_pass_equals_runtime_switch(case):
    model, x, specs, names, weights = case
    program = rewrite(model, (x,), ",".join(specs), verify=True).program
    _randomize(program)
    text = "+".join(f"{n}:{w}" for n, w in zip(names, weights))
    by_pass = rewrite(program, (x,), f"lora-select{{adapters={text}}}", verify=True)
    set_adapters(program, names, weights)
    with torch.no_grad():
        torch.testing.assert_close(by_pass.module()(x), program.module()(x), rtol=1e-5, atol=1e-6)
    set_adapters(program, [])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_weights_scale_a_plain_adapter_linearly():
    torch.manual_seed(0)
    model, x = torch.nn.Linear(8, 5), torch.randn(3, 8)
    program = rewrite(model, (x,), "lora{name=a,rank=2,init=gaussian}").program
    _randomize(program)
    with torch.no_grad():
        y0 = model(x)
        outs = {}
        for w in (1.0, 0.25, -2.0):
            set_adapters(program, ["a"], [w])
            outs[w] = program.module()(x)
    for w in (0.25, -2.0):
        torch.testing.assert_close(outs[w] - y0, w * (outs[1.0] - y0), rtol=1e-4, atol=1e-6)


def test_runtime_changes_need_no_export(three, monkeypatch, tmp_path):
    base, model, folders, result, x = three
    def no_export(*a, **k):
        raise AssertionError("re-exported")
    monkeypatch.setattr(torch.export, "export", no_export)
    set_adapters(result.program, "u:0.5+w")
    assert adapter_table(result.program)["u"]["gate"] == 0.5 and adapter_table(result.program)["v"]["gate"] == 0.0
    module = result.module()
    set_adapters(module, ["v"])                        # a module made earlier is switched directly
    assert adapter_table(module)["v"]["gate"] == 1.0


def test_fixed_form_is_always_on_and_says_how_to_switch(tiny_gpt):
    model, args = tiny_gpt
    result = rewrite(model, args, "lora{rank=2}")
    set_adapters(result.program, ["default"])          # what it is already: fine
    with pytest.raises(UserError, match="fixed form"):
        result.set_adapters([])
    with pytest.raises(UserError, match="no adapter named 'x'"):
        result.set_adapters(["x"])
    switched = rewrite(result.program, None, "lora-select{adapters=none}")
    assert {str(n.target) for n in switched.program.graph.nodes
            if n.op == "call_function" and "lora" in str(n.target)} == {"rewrite.multi_lora_linear.default"}


def test_second_named_adapter_turns_a_fixed_layer_switchable(tiny_gpt):
    model, args = tiny_gpt
    result = rewrite(model, args, "lora{rank=2,targets='attn.q$'},lora{name=extra,rank=3,targets='attn.q$'}",
                     verify=True)
    names = [n.args[7] for n in result.program.graph.nodes if "multi_lora" in str(n.target)]
    assert names == ["default,extra", "default,extra"]
    again = rewrite(result.program, None, "lora{name=extra,targets='attn.q$'}")
    assert all(s["reason"] == 'already has an adapter named "extra"' for s in again.report.passes[0].sites)


def test_hotswap_equals_loading_the_new_adapter(tmp_path):
    torch.manual_seed(0)
    base = Net().eval()
    x = torch.randn(4, 12)
    first = save_each(peft_model(base, {"u": ADAPTERS["u"]}, seed=1), tmp_path / "one")["u"]
    second = save_each(peft_model(base, {"u": dict(ADAPTERS["u"], lora_alpha=7)}, seed=2), tmp_path / "two")["u"]
    program = rewrite(base, (x,), f"lora{{adapter='{first}',name=a}}").program
    direct = rewrite(base, (x,), f"lora{{adapter='{second}',name=a}}").module()
    module = program.module()
    assert hotswap(program, "a", second) == ["fc1", "fc2", "out"]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), direct(x))
        torch.testing.assert_close(module(x), direct(x))     # the tensors were replaced in place
    other = save_each(peft_model(base, {"u": dict(ADAPTERS["u"], r=3)}, seed=3), tmp_path / "three")["u"]
    with pytest.raises(UserError, match="same shapes"):
        hotswap(program, "a", other)
    with pytest.raises(UserError, match="no layer holds an adapter named 'zz'"):
        hotswap(program, "zz", second)


def test_cli_swap_in_a_saved_program_and_save_named_adapter(three, tmp_path, capsys, monkeypatch):
    base, model, folders, result, x = three
    saved = tmp_path / "three.pt2"
    result.save(str(saved))
    out = tmp_path / "swapped.pt2"
    with monkeypatch.context() as m:      # a swap in a saved program changes tensors only: no re-export
        m.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-exported")))
        assert main([str(saved), "--pass", f"lora-swap{{name=w,adapter='{folders['w']}'}}",
                     "-q", "-o", str(out), "--save-adapter", f"{tmp_path / 'v_again'}:v"]) == 0
    assert "lora-swap" in capsys.readouterr().out
    set_active(model, ["w"])
    swapped = torch.export.load(str(out))
    set_adapters(swapped, ["w"])
    with torch.no_grad():
        torch.testing.assert_close(swapped.module()(x), model(x), rtol=1e-5, atol=1e-5)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "v_again")).eval()
    set_active(model, ["v"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert main([str(saved), "--pass", "lora-select{adapters=u}", "-q", "--save-adapter", str(tmp_path / "x")]) == 2
    assert "name the one to save" in capsys.readouterr().err
    assert main([str(saved), "--pass", "lora-swap{name=w}", "-q"]) == 2
    assert "lora-swap needs adapter=DIR" in capsys.readouterr().err


def test_program_with_named_adapters_round_trips_through_pt2(three, tmp_path):
    *_, result, x = three
    set_adapters(result.program, ["u", "w"], [1.0, 0.5])
    path = tmp_path / "named.pt2"
    result.save(str(path))
    code = ("import torch, rewriter\n"
            "from rewriter.lora_runtime import set_adapters, adapter_table\n"
            f"ep = torch.export.load({str(path)!r}); x = ep.example_inputs[0][0]\n"
            "t = adapter_table(ep); assert t['u']['gate'] == 1.0 and t['w']['gate'] == 0.5 and t['v']['gate'] == 0\n"
            "y = ep.module()(x); set_adapters(ep, ['v']); z = ep.module()(x)\n"
            "assert not torch.allclose(y, z)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("spec, message", [
    ("lora{name='a b'}", "must be an identifier"),
    ("lora{name=1x}", "must be an identifier"),
    ("lora-select{adapters=nope}", "no adapter named 'nope'"),
    ("lora-combine{adapters='a:x'}", "bad weight"),
])
def test_user_errors_are_one_line(spec, message, capsys):
    code = main(["demo:tiny-gpt", "--pass", f"lora{{name=a,rank=2}},{spec}", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_batch_index_api_errors(three):
    *_, result, x = three
    with pytest.raises(UserError, match="run lora-batch"):
        set_adapter_index(result.program, ["u"])
    batched = rewrite(result.program, None, "lora-batch{adapters='u,v,w'}")
    with pytest.raises(UserError, match="has no batch id"):
        batched.set_adapter_index(["zz"])
    with adapter_index(batched.program, ["u", "v", None, "w", "u"]):
        assert batched.program.state_dict["lora_index"].tolist() == [0, 1, -1, 2, 0]
    assert batched.program.state_dict["lora_index"].numel() == 0


def test_name_option_round_trips_through_specs(capsys):
    from rewriter import parse_pipeline, print_pipeline
    text = "lora{name=x,dora=true},lora-swap{name=x,adapter=d},lora-combine{adapters=x:1,name=y}"
    passes = parse_pipeline(text)
    assert passes[0].adapter_name == "x" and passes[1].adapter_name == "x" and passes[2].adapter_name == "y"
    assert print_pipeline(passes) == text
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    for needle in ("lora-select", "lora-combine", "lora-batch", "lora-swap", "name="):
        assert needle in listing
