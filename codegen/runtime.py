"""Where kernels can run: CUDA tensors, or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).

Anything else (CPU without the interpreter, float64, a missing Triton) runs the op's reference implementation;
the first such fallback per op prints a one-line notice.
"""
from __future__ import annotations

import os
import sys
import time

import torch

_NOTICED: set[str] = set()
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on the host. (triton.cdiv and triton.next_power_of_2 are constexpr functions costing ~9 µs a call
    in triton 3.9 — launch code calls them a dozen times per op, more than a small kernel runs.)"""
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1), on the host."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def interpreter() -> bool:
    """Whether Triton runs kernels in its interpreter. Read once: triton reads TRITON_INTERPRET when a kernel is
    first defined, so it cannot change meaning later in a process (and the launch path asks several times a
    call)."""
    global _INTERPRETER
    if _INTERPRETER is None:
        _INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _INTERPRETER


_INTERPRETER: bool | None = None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def can_launch(*tensors) -> bool:
    """True when a Triton kernel can run on these tensors here (all on one CUDA device, or CPU + interpreter)."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts or not triton_available():
        return False
    if all(t.is_cuda for t in ts):
        return len({t.device for t in ts}) == 1
    return interpreter() and all(t.device.type == "cpu" for t in ts)


def backend_note() -> str | None:
    """One line explaining why kernels will fall back on this machine, or None when they can run."""
    if not triton_available():
        return "codegen: triton is not installed; lowered ops run their reference implementations"
    if not torch.cuda.is_available() and not interpreter():
        return ("codegen: no CUDA device and TRITON_INTERPRET is not set; lowered ops run their reference "
                "implementations on CPU")
    return None


OFFSET_LIMIT = 2**31


def offsets_reason(*tensors, out_numel: int = 0) -> str | None:
    """Why 32-bit offsets cannot address these tensors (None when they can). Kernels index with int32 program ids
    times strides, so every element's offset — Σ (size−1)·|stride| — and the output's size must stay < 2³¹."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
            if span >= OFFSET_LIMIT:
                return f"a {tuple(t.shape)} input spans ≥ 2³¹ elements (kernels use 32-bit offsets)"
    if out_numel >= OFFSET_LIMIT:
        return f"the output has {out_numel} ≥ 2³¹ elements (kernels use 32-bit offsets)"
    return None


def notice_fallback(op: str, reason: str) -> None:
    if op not in _NOTICED:
        _NOTICED.add(op)
        print(f"rewrite: {op}: {reason}; running the reference implementation", file=sys.stderr)


def bf16_ok() -> bool:
    """bf16 arithmetic is broken in the interpreter: kernels upcast right after loads there anyway."""
    return not interpreter()


def mma_upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel upcasts its tl.dot operands to fp32 (the `UPCAST` constexpr of the templates).

    fp16 stays fp16 everywhere (GPU: tensor-core MMA with fp32 accumulation; the interpreter's numpy dot also
    accumulates fp16 operands in fp32), bf16 stays bf16 on a GPU; fp32 inputs (exact IEEE dot) and bf16 under the
    interpreter (its bf16 is broken) are upcast. An fp32 intermediate fed to a second dot is then cast to the input
    dtype when this is False (tl.dot needs both operands in one dtype)."""
    if dtype == torch.float16:
        return False
    if dtype == torch.bfloat16:
        return interpreter()
    return True


def interpreter_bench(kernel_call, quantiles=None) -> list[float]:
    """The autotuner's benchmark where CUDA events do not exist (the interpreter): wall-clock ms of one call
    after a warm-up call, as the (p50, p20, p80) the autotuner asks for."""
    kernel_call()
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms, ms, ms]


def autotune(kernel, key: list[str], gpu_configs: list, interpreter_configs: list):
    """`kernel` autotuned over `gpu_configs` (triton's CUDA-event benchmark) on a GPU, or over the small
    `interpreter_configs` with interpreter_bench under the interpreter — so the autotuned launch path (config
    choice, grid from the chosen meta-parameters, per-key cache) runs in the CPU tests too."""
    import triton
    if interpreter():
        return triton.autotune(configs=interpreter_configs, key=key, do_bench=interpreter_bench)(kernel)
    return triton.autotune(configs=gpu_configs, key=key)(kernel)
