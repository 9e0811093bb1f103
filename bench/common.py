"""Benchmark helpers: side-by-side timing, machine description, markdown tables."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def time_side_by_side(fns: dict, repeats: int = 15, stat: str = "min") -> dict:
    """Seconds per call of each zero-argument fn: best (or median) of `repeats` rounds. Rounds are interleaved so
    load changes hit all variants alike. The best round is the default: on a shared machine the OS deschedules
    OpenMP threads for whole time slices (tens of ms), which the median still catches and the minimum does not.
    Fast calls are repeated inside a round so that one round lasts at least ~2 ms."""
    with torch.inference_mode():
        for fn in fns.values():   # warm up
            fn()
            fn()
        first = next(iter(fns.values()))
        t0 = time.perf_counter()
        first()
        one = time.perf_counter() - t0
        inner = max(1, int(2e-3 / max(one, 1e-6))) if one < 2e-3 else 1
        samples = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[k].append((time.perf_counter() - t0) / inner)
    pick = min if stat == "min" else statistics.median
    return {k: pick(v) for k, v in samples.items()}


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
