"""The `rewrite` command: the happy path, and bad input -> one line, the right exit code, nothing damaged."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rewriter.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*argv, cwd=None):
    """Run the real console entry point in a subprocess (as a user would)."""
    env = dict(os.environ, PYTHONPATH=ROOT, COLUMNS="80")
    out = subprocess.run([sys.executable, "-m", "rewriter.cli", *argv], capture_output=True, text=True,
                         cwd=cwd or ROOT, env=env, timeout=300)
    return out.returncode, out.stdout, out.stderr


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip() and "NumPy" not in line
             and "_conversion_method_template" not in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_demo_pipeline_writes_a_loadable_program(tmp_path, capsys):
    out = tmp_path / "gpt.pt2"
    code = main(["demo:tiny-gpt", "--pass", "lora{rank=4,init=pissa},lora-merge", "--verify", "--diff", "-q",
                 "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "rewrite.lora_linear" in text and "lora-merge" in text and "✓" in text
    program = torch.export.load(str(out))
    ids = program.example_inputs[0][0]
    from rewriter.demo_models import demo_model
    model, _ = demo_model("tiny-gpt")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_json_report(capsys):
    assert main(["demo:tiny-bert", "--pass", "lora{rank=2}", "--verify", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (p,) = data["passes"]
    assert p["name"] == "lora" and p["changed"] and p["error_vs_previous"] == 0.0
    assert len(p["sites"]) == 12 and data["verified"]


def test_passes_table_lists_contracts(capsys):
    assert main(["passes", "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lora"]["contract"] == "exact" and any(o.startswith("rank=") for o in rows["lora"]["options"])


def test_show_and_diff(tmp_path, capsys):
    out = tmp_path / "merged.pt2"
    assert main(["demo:tiny-vit", "--pass", "lora,lora-merge", "-q", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["show", str(out), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ops"]["aten.linear"] == 10 and summary["params"]["params"] > 0
    assert main(["diff", "demo:tiny-vit", str(out), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["error"] == 0.0 and any(p[0].endswith("lora_correction") for p in d["params"]["added"])


def test_instruments(tmp_path, capsys):
    dump = tmp_path / "dump"
    assert main(["demo:tiny-gpt", "--pass", "lora,lora-merge", "-q", "--time-passes", "--print-after", "lora",
                 "--dump-dir", str(dump)]) == 0
    text = capsys.readouterr().out
    assert "pass timing" in text and "torch.ops.rewrite.lora_linear" in text
    assert sorted(os.listdir(dump)) == ["000_input.py", "001_lora.py", "002_lora_merge.py"]
    assert "lora_linear" in (dump / "001_lora.py").read_text()
    assert "lora_linear" not in (dump / "002_lora_merge.py").read_text()


@pytest.mark.parametrize("argv, code, fragment", [
    (["missing.pt2", "--pass", "lora"], 2, "no such file"),
    (["demo:tiny-gpt", "--pass", "lorra"], 2, 'did you mean "lora"'),
    (["demo:tiny-gpt", "--pass", "lora{rank=x}"], 2, "expected an integer"),
    (["demo:tiny-gtp", "--pass", "lora"], 2, "did you mean"),
    (["demo:tiny-gpt", "--pass", "lora{targets=zzz}"], 2, "no linear layer matches"),
    (["tests.helpers:untraceable_factory", "--pass", "lora"], 2, "does not export"),
    (["demo:tiny-gpt", "--pass", "lora", "-o", "out.pt"], 2, "must end with .pt2"),
])
def test_bad_input_one_line_and_exit_code(argv, code, fragment):
    rc, _, err = run_cli(*argv)
    assert rc == code, err
    assert fragment in _one_line_error(err)


def test_untraceable_model_names_the_line():
    rc, _, err = run_cli("tests.helpers:untraceable_factory", "--pass", "lora")
    line = _one_line_error(err)
    assert rc == 2 and "helpers.py" in line


def test_corrupt_file_and_input_never_overwritten(tmp_path):
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"not a zip file at all")
    rc, _, err = run_cli(str(bad), "--pass", "lora")
    assert rc == 2 and "not a readable torch.export program" in _one_line_error(err)
    good = tmp_path / "model.pt2"
    assert main(["demo:tiny-gpt", "--pass", "lora", "-q", "-o", str(good)]) == 0
    before = good.read_bytes()
    rc, _, err = run_cli(str(good), "--pass", "lora-merge", "-o", str(good))
    assert rc == 2 and "refusing to overwrite the input" in _one_line_error(err)
    assert good.read_bytes() == before


def test_state_dict_and_pickles(tmp_path):
    from tests.helpers import stack_factory
    model, args = stack_factory()
    sd = tmp_path / "weights.pt"
    torch.save(model.state_dict(), sd)
    rc, _, err = run_cli(str(sd), "--pass", "lora")
    assert rc == 2 and "state dict" in _one_line_error(err)
    whole = tmp_path / "whole.pt"
    torch.save((model, args), whole)
    rc, _, err = run_cli(str(whole), "--pass", "lora")
    assert rc == 2 and "--trust-pickle" in _one_line_error(err)
    out = tmp_path / "out.pt2"
    rc, _, err = run_cli(str(whole), "--pass", "lora{rank=2}", "--trust-pickle", "-q", "-o", str(out))
    assert rc == 0, err and out.exists()
    bare = tmp_path / "bare.pt"
    torch.save(model, bare)
    rc, _, err = run_cli(str(bare), "--pass", "lora", "--trust-pickle")
    assert rc == 2 and "--input-shape" in _one_line_error(err)
    rc, _, err = run_cli(str(bare), "--pass", "lora", "--trust-pickle", "--input-shape", "3x8")
    assert rc == 0, err


def test_nan_weights_are_refused(tmp_path):
    from tests.helpers import stack_factory
    model, args = stack_factory()
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save((model, args), path)
    rc, _, err = run_cli(str(path), "--pass", "lora", "--trust-pickle")
    assert rc == 2 and "NaN" in _one_line_error(err) and "layers.0.weight" in err


def test_failed_verification_writes_nothing_unless_forced(tmp_path, monkeypatch, capsys):
    """A pass that breaks its exact contract: exit 1, no file; --force writes it anyway."""
    from passes.lora import LoraPass

    original_scale = LoraPass.scale
    monkeypatch.setattr(LoraPass, "_zero_init", lambda self, w, r, g: (torch.ones(r, w.shape[1]),
                                                                          torch.ones(w.shape[0], r)))
    out = tmp_path / "bad.pt2"
    assert main(["demo:tiny-gpt", "--pass", "lora", "--verify", "-q", "-o", str(out)]) == 1
    assert not out.exists()
    assert "broke its exact contract" in capsys.readouterr().err
    assert main(["demo:tiny-gpt", "--pass", "lora", "--verify", "-q", "--force", "-o", str(out)]) == 1
    assert out.exists()
    assert LoraPass.scale is original_scale


def test_cli_dynamic_export(tmp_path):
    out = tmp_path / "dyn.pt2"
    assert main(["demo:tiny-bert", "--pass", "lora{rank=2}", "--dynamic", "-q", "-o", str(out)]) == 0
    module = torch.export.load(str(out)).module()
    assert module(torch.randint(0, 256, (1, 33))).shape == (1, 33, 64)


def test_codegen_verify_prints_no_torch_internal_warnings(tmp_path):
    """torch's own deprecation warnings (pytree LeafSpec, raised while the verifier copies the graph) do not reach
    the user's console; --debug still shows them."""
    out = tmp_path / "lowered.pt2"
    rc, stdout, stderr = run_cli("demo:tiny-gpt", "--pass", "lowrank{rank=8}", "--codegen", "triton", "--verify",
                                 "-q", "-o", str(out))
    assert rc == 0 and out.exists(), stderr
    assert "Warning" not in stderr and "Warning" not in stdout, stderr
