"""The zoo: one tiny model per architecture family (configs built in code, random weights, no downloads), each
saved with save_pretrained and rewritten from its folder through the CLI with --verify. Every run must end
rewritten-and-verified (exit 0) or declined with a one-line reason (exit 2) — never an internal error (exit 3) —
and keep the checkpoint's dtype. The saved program loads with torch.export.load and matches the model."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import rewriter  # noqa: E402,F401  (registers the custom ops torch.export.load needs)
from rewriter import hf  # noqa: E402
from rewriter.cli import main  # noqa: E402
from rewriter.verify import EXACT_TOLERANCE, relative_error  # noqa: E402
from tests import hf_zoo  # noqa: E402

PIPELINE = "lora{rank=4,init=gaussian},lora-merge,two-pass-softmax,monarch{blocks=2}"
# the quick half runs on every `pytest`; the rest is marked slow (still part of `make test`)
FAST = {"llama", "gpt2", "bert", "vit", "t5"}
# models that may decline a pass, with the reason they give (none today; a new one must be listed here)
DECLINES: dict[str, str] = {}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in hf_zoo.names()])
def test_zoo_model_rewrites_from_its_folder(name, tmp_path, capsys):
    folder, dtype, shape = hf_zoo.save(name, tmp_path / name)
    out = tmp_path / "out.pt2"
    argv = [folder, "--pass", PIPELINE, "--verify", "-q", "-o", str(out), "--format", "json"]
    rc = main(argv + (["--input-shape", shape] if shape else []))
    captured = capsys.readouterr()
    if rc == 2:
        reason = captured.err.strip()
        assert "\n" not in reason and reason.startswith("error:")
        assert name in DECLINES and DECLINES[name] in reason, f"{name} declined: {reason}"
        return
    assert rc == 0, f"{name}: exit {rc}: {captured.err.strip()}"
    report = json.loads(captured.out)
    assert report["verified"] is True
    lora, merge, softmax, monarch = report["passes"]
    assert lora["sites"] and merge["sites"] and monarch["sites"]
    assert softmax["sites"] or softmax["skipped"]
    # the saved program: plain torch.export.load (+ import rewriter), the checkpoint's dtype, the model's outputs
    program = torch.export.load(str(out))
    weights = [t for t in program.state_dict.values() if t.is_floating_point() and t.ndim == 2]
    assert weights and all(t.dtype == dtype for t in weights if t.numel() > 64), name
    model, args, kwargs = hf.load_hf(folder, input_shape=shape)
    with torch.no_grad():
        expected = model(*args, **kwargs)
        got = program.module()(*args, **kwargs)
    assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
    # monarch is approximate, so the output moved; the saved program must compute what was verified: the same
    # error against the model as the report's, up to the rounding of the dtype
    error = relative_error([expected], [got])
    assert abs(error - report["error"]) <= EXACT_TOLERANCE[dtype], (name, error, report["error"])
