"""Benchmark helpers: median timing of side-by-side variants, machine description, markdown tables."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def time_call(fn, *, warmup: int = 3, repeat: int = 15, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds (p50 over `repeat` runs after `warmup`)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        start = time.perf_counter()
        while len(samples) < repeat or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return (f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
