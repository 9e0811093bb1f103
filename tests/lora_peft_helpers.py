"""PEFT-side fixtures shared by the LoRA tests: a small model, PEFT adapters with non-zero B, saved folders."""
from __future__ import annotations

import copy

import torch
from torch import nn


class Net(nn.Module):
    """Three linears with ReLUs between them (PEFT targets them by name)."""

    def __init__(self, d_in=12, hidden=16, d_out=6):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def peft_model(base: nn.Module, adapters: dict[str, dict], seed: int = 0, b_scale: float = 0.3):
    """PEFT model over a copy of `base` with the named adapters (LoraConfig kwargs each; the first is active),
    every lora_B (and DoRA magnitude) randomised — as after training."""
    import peft
    torch.manual_seed(seed)
    names = list(adapters)
    model = None
    for name in names:
        config = peft.LoraConfig(init_lora_weights="gaussian", **adapters[name])
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
            elif "lora_magnitude_vector" in pname:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    return model.eval()


def save_each(model, folder) -> dict[str, str]:
    """Save every adapter of a PEFT model to its own folder; {name: folder}."""
    out = {}
    for name in model.peft_config:
        path = folder / name
        model.save_pretrained(str(path), selected_adapters=[name])
        # PEFT writes a non-default adapter to path/name
        sub = path / name
        out[name] = str(sub if (sub / "adapter_config.json").exists() else path)
    return out


def set_active(model, names):
    """PEFT: make exactly these adapters active (several at once through the LoraModel)."""
    model.base_model.set_adapter(list(names))
