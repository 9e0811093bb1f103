"""PEFT adapters in and out: same outputs as PEFT itself, round trip through our programs."""
import copy

import pytest
import torch
from torch import nn

from rewriter import UserError, rewrite
from rewriter.cli import main

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.out(x)


def _peft_adapter(tmp_path, **config):
    torch.manual_seed(0)
    base = Net().eval()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["blocks.0", "blocks.1"],
                                                                      init_lora_weights="gaussian", **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    return base, model.eval(), str(folder)


@pytest.mark.parametrize("config", [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True),
                                    dict(r=2, lora_alpha=4, alpha_pattern={"blocks.1": 16})])
def test_loading_a_peft_adapter_matches_peft(tmp_path, config):
    base, peft_model, folder = _peft_adapter(tmp_path, **config)
    x = torch.randn(3, 16)
    result = rewrite(base, (x,), f"lora{{adapter='{folder}'}}")
    assert [s["site"] for s in result.report.passes[0].sites] == ["blocks.0", "blocks.1"]
    with torch.no_grad():
        torch.testing.assert_close(result.module()(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_saved_adapter_round_trips_through_peft(tmp_path, capsys):
    base, peft_model, folder = _peft_adapter(tmp_path, r=4, lora_alpha=8)
    x = torch.randn(3, 16)
    merged = rewrite(base, (x,), f"lora{{adapter='{folder}'}},lora-merge")
    from rewriter.peft_interop import write_adapter
    out = tmp_path / "exported"
    assert write_adapter(merged.program.module(), str(out)) == 2
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_cli_save_adapter_and_bad_adapter_folder(tmp_path, capsys):
    out = tmp_path / "gpt-adapter"
    assert main(["demo:tiny-gpt", "--pass", "lora{rank=2,targets=mlp}", "-q", "--save-adapter", str(out)]) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    with pytest.raises(UserError, match="adapter_config.json not found"):
        rewrite("demo:tiny-gpt", None, f"lora{{adapter='{tmp_path}'}}")


def test_save_adapter_without_adapters_is_a_user_error(tmp_path, capsys):
    assert main(["demo:tiny-gpt", "--pass", "two-pass-softmax", "-q", "--save-adapter", str(tmp_path / "a")]) == 2
    assert "no LoRA adapters to save" in capsys.readouterr().err
