"""bench.e2e's harness on a tiny GPT on the CPU (kernels in the interpreter, timing stubbed): every pass is
rewritten, moved, lowered and checked against its aten path; rows carry the ratios the README table needs."""
import pytest
import torch

from codegen.testing import kernel_device

pytestmark = pytest.mark.skipif(kernel_device().type != "cpu", reason="a CPU smoke run of the GPU harness")

TINY = dict(vocab=64, dim=32, heads=2, layers=1, batch=2, tokens=16)


def test_e2e_harness_runs_tiny(monkeypatch):
    import bench.e2e as e2e
    calls = []

    def fake_timer(device):
        def time_fns(fns):
            out = {}
            for name, fn in fns.items():
                with e2e.kernels_mode("aten" if name.endswith(" aten") else None):
                    calls.append(name)
                    fn()
                out[name] = 2e-3 if name == "base" else 1e-3
            return out
        return time_fns
    monkeypatch.setattr(e2e, "timer", fake_timer)
    rows = e2e.run(TINY, ["lora{rank=2}", "two-pass-softmax"], [torch.float32], torch.device("cpu"),
                   compile_base=False, log=lambda m: None)
    names = [r["variant"] for r in rows]
    assert names == ["base", "lora{rank=2} aten", "lora{rank=2} lowered", "two-pass-softmax aten",
                     "two-pass-softmax lowered"] and calls == names
    low = rows[2]
    assert low["vs_base"] == 0.5 and low["vs_aten"] == 1.0
    kernels = [k for k, _ in low["sites"]]
    assert sum(k.startswith("lora_linear") for k in kernels) == 6    # q, k, v, proj, fc1, fc2 of the one block
    assert all(isinstance(impl, str) and impl for _, impl in low["sites"])


def test_e2e_check_refuses_a_wrong_program():
    import bench.e2e as e2e
    want = torch.randn(2, 3, 5)
    e2e._check(want + 1e-6, want, "ok")
    with pytest.raises(AssertionError, match="differs from its aten path"):
        e2e._check(want + 1.0, want, "wrong")
