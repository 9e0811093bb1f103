"""Two-pass softmax (Dukhan & Ablavatski) vs torch.softmax vs a naive three-pass softmax, CPU, rows of 1K–1M.

    .venv/bin/python -m bench.softmax [--quick] [--threads N]

What is measured — be careful reading it: all three softmaxes here are sequences of PyTorch ops, each op a full
sweep over memory, so "two-pass" and "three-pass" name the algorithms, not the number of sweeps:
    torch       torch.softmax: one fused ATen kernel (sweeps the row ~3 times inside, cache-hot for short rows)
    three-pass  amax, exp(x − max), sum, divide: 4 separate ops over the row (the textbook algorithm)
    two-pass    rewrite::two_pass_softmax's reference (what the pass inserts): round, Cody–Waite reduction,
                exp, amax of exponents, scaled sum, scale — exponent bookkeeping in float64 for exactness over the
                whole float32 range, so it moves ~5× the bytes of the input
    two-pass-f32  the same algorithm with fp32 exponents and an fp32 Cody–Waite split (exact for |x| < 355):
                the cost of the algorithm itself in PyTorch ops (~9 ops)
The paper's 28 % gain over three-pass is for one fused loop per pass (XNNPACK, AVX512) on out-of-cache rows;
the fused kernel is codegen's job. GB/s counts the bytes a softmax must move (read input once, write output once).
"""
from __future__ import annotations

import argparse
import json

import torch

from bench.common import machine, markdown_table, time_side_by_side
from rewriter.ops import two_pass_softmax as tps


def three_pass(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    m = x.amax(dim, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim, keepdim=True)


LN2_HI_F32, LN2_LO_F32 = 0.693145751953125, 1.428606765330187e-06


def two_pass_f32(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    n = torch.round(x * tps.LOG2E)
    p = torch.exp((x - n * LN2_HI_F32) - n * LN2_LO_F32)
    e = n.amax(dim, keepdim=True)
    scale = torch.exp2(n - e)
    return p * scale / (p * scale).sum(dim, keepdim=True)


VARIANTS = {"torch": lambda x: torch.softmax(x, -1), "three-pass": three_pass,
            "two-pass": lambda x: tps.reference(x, -1), "two-pass-f32": two_pass_f32}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 row lengths, fewer repeats")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [1024, 65536, 1048576] if args.quick else [1024, 8192, 65536, 262144, 1048576]
    total = 2 ** 20 if args.quick else 2 ** 22          # elements per call: rows × length
    repeat = 5 if args.quick else 11
    gen = torch.Generator().manual_seed(0)
    rows, results = [], []
    for n in lengths:
        x = torch.randn(max(1, total // n), n, generator=gen) * 5
        moved = 2 * x.numel() * x.element_size()
        times = time_side_by_side({name: (lambda f=f: f(x)) for name, f in VARIANTS.items()}, repeats=repeat)
        err = float((tps.reference(x, -1).double() - torch.softmax(x.double(), -1)).abs().max())
        gbs = {k: moved / t / 1e9 for k, t in times.items()}
        rows.append([n, x.shape[0], gbs["torch"], gbs["three-pass"], gbs["two-pass"], gbs["two-pass-f32"],
                     times["three-pass"] / times["two-pass-f32"], times["three-pass"] / times["two-pass"], err])
        results.append({"row_len": n, "rows": x.shape[0], "seconds": times, "GBps": gbs, "max_abs_err": err})
    headers = ["row length", "rows", "torch GB/s", "three-pass GB/s", "two-pass (op) GB/s", "two-pass-f32 GB/s",
               "two-pass-f32 speed / three-pass", "two-pass (op) speed / three-pass", "op max abs err vs fp64"]
    print(f"softmax, fp32, {machine()}")
    print(markdown_table(headers, rows))
    print(json.dumps({"bench": "softmax", "machine": machine(), "results": results}))


if __name__ == "__main__":
    main()
