"""Small models and utilities shared by tests."""
from __future__ import annotations

import torch
from torch import nn


class LinearStack(nn.Module):
    """Linear layers with GELU between them: dims[0] -> dims[1] -> ... (bias per layer)."""

    def __init__(self, dims, biases):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b, bias in zip(dims, dims[1:], biases))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


def randomize_adapters(program: torch.export.ExportedProgram, seed: int = 0, scale: float = 0.1) -> None:
    """Give every LoRA B (initialised to zero) random values, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in program.state_dict.items():
            if name.endswith(".lora_B"):
                t.copy_((torch.randn(t.shape, generator=gen) * scale).to(t.dtype))


def untraceable_factory():
    """A model with data-dependent Python control flow: export must fail with a clear message."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    return Branchy(), (torch.randn(2, 4),)


def stack_factory():
    torch.manual_seed(0)
    return LinearStack([8, 16, 8], [True, False]), (torch.randn(3, 8),)


class StubContext:
    """A stand-in pass context around a captured program (what calibration.py reads)."""

    def __init__(self, model, args, dynamic=False, **resources):
        from rewriter.capture import capture
        from rewriter.verify import flat_inputs
        c = capture(model, args, dynamic=dynamic)
        self.gm, self.inputs = c.gm, flat_inputs(c.args, c.kwargs)
        self.teacher = None
        self.resources = {"dynamic": c.dynamic, **resources}
        self.messages = []

    def message(self, text):
        self.messages.append(text)

    def progress(self, items, description, status=None):
        return items
