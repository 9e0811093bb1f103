"""Test helpers for kernels: guarded buffers around inputs and outputs.

`guarded(t, strided=...)` copies `t` into a view in the middle of a larger NaN-filled buffer (optionally with a
column stride of 2, so the view is non-contiguous and NaN sits between its elements): a kernel that reads out of
bounds pulls NaN into its result. `guarded_output(shape, dtype)` does the same for an output with a finite
sentinel (NaN would hide an out-of-bounds write of NaN); `guard_intact(view)` says whether everything outside the
view still holds its fill, i.e. nothing was written out of bounds.

Where kernels run: `kernel_device()` is the CPU (Triton interpreter, the default) or whatever
REWRITE_TEST_DEVICE names — `make test-gpu` runs the kernel tests compiled on CUDA with
REWRITE_TEST_DEVICE=cuda TRITON_INTERPRET=0. Tests build inputs and float64 references on the CPU and move
kernel inputs with `on_device(t)` (guarded buffers are allocated there); results come back with `.cpu()`.
"""
from __future__ import annotations

import os

import torch

PAD = 67
OUT_SENTINEL = -7777.0


def kernel_device() -> torch.device:
    """The device kernel tests run on: REWRITE_TEST_DEVICE (e.g. "cuda"), default the CPU interpreter."""
    return torch.device(os.environ.get("REWRITE_TEST_DEVICE", "cpu"))


def on_device(t):
    """`t` moved to the test device (None and non-tensors pass through)."""
    return t.to(kernel_device()) if isinstance(t, torch.Tensor) else t


class LaunchSpy:
    """Stands in for a @triton.jit kernel (monkeypatch it over the module's name): records each launch's keyword
    arguments in `calls` (constexprs such as UPCAST), then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return run


def program_on_device(program):
    """An ExportedProgram moved to the test device (the same object on the CPU): passes run on the CPU, kernels
    on the device."""
    if kernel_device().type == "cpu":
        return program
    from torch.export.passes import move_to_device_pass
    return move_to_device_pass(program, str(kernel_device()))


def guarded(t: torch.Tensor, strided: bool = False, fill: float = float("nan")) -> torch.Tensor:
    """A copy of `t` on the test device, as a view in the middle of a `fill`-ed buffer."""
    shape = list(t.shape) or [1]
    numel = t.numel()
    step = 2 if strided else 1
    big = torch.full((numel * step + 2 * PAD,), fill, dtype=t.dtype, device=kernel_device())
    body = big[PAD:PAD + numel * step]
    view = body.view(*shape[:-1], shape[-1] * step)[..., ::step] if numel else body.view(shape)
    view = view.reshape(t.shape) if t.dim() == 0 else view
    view.copy_(t.to(big.device))
    view._guard_base = big  # keep the buffer reachable for guard_intact
    view._guard_fill = fill
    return view


def guarded_output(shape, dtype, strided: bool = False) -> torch.Tensor:
    """A zero output view inside a buffer filled with OUT_SENTINEL."""
    return guarded(torch.zeros(shape, dtype=dtype), strided=strided, fill=OUT_SENTINEL)


def guard_intact(view: torch.Tensor) -> bool:
    """True when every element of the buffer outside `view` still holds the fill value."""
    big = view._guard_base
    idx = torch.arange(big.numel(), device=big.device)
    inside = torch.as_strided(idx, view.shape, view.stride(), view.storage_offset())
    outside = torch.ones(big.numel(), dtype=torch.bool, device=big.device)
    outside[inside.reshape(-1)] = False
    rest = big[outside].float()
    fill = torch.full((1,), view._guard_fill, dtype=big.dtype, device=big.device).float()
    if torch.isnan(fill).all():
        return bool(torch.isnan(rest).all())
    return bool((rest == fill).all())
