"""Softplus attention (LSSA) and SOFT vs SDPA and eager softmax attention, CPU, sequence lengths 128 → 8192.

    .venv/bin/python -m bench.attention [--quick] [--landmarks 32] [--threads N]

Each (variant, T) runs in a fresh subprocess: time is the median of a few calls, peak memory is the growth of the
process's peak RSS (ru_maxrss) over the inputs — i.e. the working memory the attention needs, temporaries included.
Variants (B=1, H=1, d=64, fp32, bidirectional):
    sdpa      F.scaled_dot_product_attention (ATen's fused CPU kernel: flash-style, no T×T matrix kept)
    softmax   softmax(q·kᵀ/√d)·v written out (materialises T×T) — what hand-written attention costs
    softplus  rewrite::softplus_attention reference (LSSA; PyTorch ops, materialises T×T several times)
    soft      rewrite::soft_attention reference, m landmarks (Nyström: T×m, linear in T)
The formula columns are the per-head FLOP counts the soft-attn pass reports (sympy, passes/soft_attn.py).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench.common import machine, markdown_table, time_side_by_side


def _variant(name: str, landmarks: int):
    from rewriter.ops import soft_attention, softplus_attention
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "softmax":
        return lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v
    if name == "softplus":
        return lambda q, k, v: softplus_attention.reference(q, k, v)
    if name == "soft":
        return lambda q, k, v: soft_attention.reference(q, v, landmarks)
    raise ValueError(name)


def worker(name: str, t: int, landmarks: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, t, 64, generator=gen) for _ in range(3))
    fn = _variant(name, landmarks)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        fn(q, k, v)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    repeat = 3 if t >= 4096 else 7
    seconds = time_side_by_side({name: lambda: fn(q, k, v)}, repeats=repeat)[name]
    return {"variant": name, "T": t, "seconds": seconds, "peak_mb": peak_kb / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 128, 512, 2048 only")
    ap.add_argument("--landmarks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.landmarks, args.threads)))
        return
    torch.set_num_threads(args.threads)
    from passes.soft_attn import T as T_SYM
    from passes.soft_attn import cost_formulas
    from rewriter.ops.soft_attention import cost_terms

    lengths = [128, 512, 2048] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192]
    variants = ["sdpa", "softmax", "softplus", "soft"]
    results = []
    for t in lengths:
        for name in variants:
            out = subprocess.run([sys.executable, "-m", "bench.attention", "--worker", name, str(t),
                                  "--landmarks", str(args.landmarks), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {(r["variant"], r["T"]): r for r in results}
    formulas = cost_formulas(args.landmarks, 64, 64, 20)
    soft_flops = cost_terms(T_SYM, args.landmarks, 64, 64, 20)[0]
    rows = []
    for t in lengths:
        ms = {n: by[(n, t)]["seconds"] * 1e3 for n in variants}
        mb = {n: by[(n, t)]["peak_mb"] for n in variants}
        rows.append([t, ms["sdpa"], ms["softmax"], ms["softplus"], ms["soft"], mb["sdpa"], mb["softmax"],
                     mb["softplus"], mb["soft"], ms["softmax"] / ms["soft"], ms["sdpa"] / ms["soft"],
                     float(261 * t * t) / float(soft_flops.subs(T_SYM, t))])
    headers = ["T", "sdpa ms", "softmax ms", "softplus ms", "soft ms", "sdpa MB", "softmax MB", "softplus MB",
               "soft MB", "soft speedup vs softmax", "soft speedup vs sdpa", "FLOP ratio softmax/soft (formula)"]
    print(f"attention, B=1 H=1 d=64 fp32, SOFT landmarks={args.landmarks}, {machine()}")
    print(markdown_table(headers, rows))
    print(f"per-head FLOPs: softmax {formulas['flops_per_head_softmax']}, SOFT {formulas['flops_per_head_soft']}; "
          f"SOFT cheaper for T ≥ {formulas['flops_crossover_T']} (FLOPs), T ≥ {formulas['memory_crossover_T']} "
          f"(attention-matrix elements: {formulas['memory_per_head_softmax']} vs {formulas['memory_per_head_soft']})")
    print(json.dumps({"bench": "attention", "machine": machine(), "landmarks": args.landmarks,
                      "formulas": formulas, "results": results}))


if __name__ == "__main__":
    main()
