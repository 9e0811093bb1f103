"""ShiftAdd / BCQ: memory, LUT-path speed on CPU, and accuracy on the demo model — side by side in one run.

    .venv/bin/python -m bench.shiftadd            # 4096×4096 weights, batch 1 (GEMV) and 16
    .venv/bin/python -m bench.shiftadd --quick    # 1024×1024
    .venv/bin/python -m bench.shiftadd --json     # figures as JSON only

Table 1 (per bits): bytes of the fp32 weight vs packed signs + int8 exponents, bits per weight, and the time of
y = x·Wᵀ three ways at each batch: dense fp32 matmul, the LUT path (`rewrite::shiftadd_linear`'s implementation,
plain torch), and dequantise-then-matmul. The LUT path is the algorithm the Triton kernel implements; in plain
torch on a CPU it moves N·out·in/8 table entries per bit plane, so it is not expected to beat a BLAS matmul — the
column is there to track it. Weights are quantised greedily (rounds=0: timing does not depend on the values).

Table 2 (demo:tiny-gpt, all linears except the tied head): per bits, mean weight and output error over layers,
the model's output error vs the original, and the model's bytes before/after (the embedding stays fp32).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench.common import time_side_by_side


def speed_table(size: int, batches: list[int], bits_list: list[int], group: int, repeats: int) -> list[dict]:
    from rewriter import bcq
    g = torch.Generator().manual_seed(0)
    w = torch.randn(size, size, generator=g) * 0.02
    rows = []
    for bits in bits_list:
        q = bcq.quantize(w, bits, group, rounds=0)
        dense_bytes = w.numel() * w.element_size()
        for batch in batches:
            x = torch.randn(batch, size, generator=g)
            with torch.no_grad():
                times = time_side_by_side({
                    "dense": lambda: x @ w.t(),
                    "lut": lambda: bcq.lut_matmul(x, q.signs, q.exponents, size, group),
                    "dequant": lambda: x @ bcq.dequantize(q.signs, q.exponents, size, group).t()}, repeats)
                t_dense, t_lut, t_deq = times["dense"], times["lut"], times["dequant"]
                err = bcq.relative_error(x @ q.dequantize().t(), bcq.lut_matmul(x, q.signs, q.exponents, size, group))
            rows.append({"size": f"{size}x{size}", "bits": bits, "group": group, "batch": batch,
                         "bytes_fp32": dense_bytes, "bytes_bcq": q.nbytes,
                         "memory_cut": 1 - q.nbytes / dense_bytes, "bits_per_weight": q.bits_per_weight,
                         "dense_ms": 1e3 * t_dense, "lut_ms": 1e3 * t_lut, "dequant_matmul_ms": 1e3 * t_deq,
                         "lut_vs_dense": t_dense / t_lut, "lut_vs_dequant_rel_err": err})
    return rows


def accuracy_table(bits_list: list[int], group: int, rounds: int, calibrate: int) -> list[dict]:
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    rows = []
    for bits in bits_list:
        for cal in ([0, calibrate] if calibrate else [0]):
            spec = f"shiftadd{{bits={bits},group={group},rounds={rounds},calibrate={cal}}}"
            r = rewrite(model, args, passes=spec, verify=True)
            res = r.report.passes[0]
            sites = [s for s in res.sites if s["status"] == "rewritten"]
            rows.append({"spec": spec, "bits": bits, "calibrate": cal, "layers": len(sites),
                         "weight_error": statistics.mean(s["weight_error"] for s in sites),
                         "layer_output_error": statistics.mean(s["output_error"] for s in sites),
                         "model_output_error": res.error_vs_original,
                         "model_bytes_before": res.params_before["bytes"],
                         "model_bytes_after": res.params_after["bytes"],
                         "linear_bytes_cut": 1 - sum(s["bytes_after"] for s in sites)
                         / sum(s["bytes_before"] for s in sites)})
    return rows


def _markdown(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r[c[0]]) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024×1024, fewer repeats")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON only")
    ap.add_argument("--size", type=int, default=None, help="weight size N (N×N); default 4096 (1024 quick)")
    ns = ap.parse_args(argv)
    size = ns.size or (1024 if ns.quick else 4096)
    repeats = 3 if ns.quick else 5
    torch.manual_seed(0)
    speed = speed_table(size, [1, 16], [2, 3, 4] if not ns.quick else [3], 128, repeats)
    acc = accuracy_table([2, 3, 4], group=32, rounds=1, calibrate=32)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "speed": speed, "accuracy": acc}
    if ns.json:
        print(json.dumps(result, indent=1))
        return
    print(f"## shiftadd: memory and matmul time (CPU, {torch.get_num_threads()} threads, best of {repeats} interleaved rounds)\n")
    print(_markdown(speed, [("size", "W"), ("bits", "bits"), ("batch", "batch"), ("bits_per_weight", "bits/weight"),
                            ("memory_cut", "memory cut"), ("dense_ms", "dense ms"), ("lut_ms", "LUT ms"),
                            ("dequant_matmul_ms", "dequant+mm ms"), ("lut_vs_dense", "dense/LUT"),
                            ("lut_vs_dequant_rel_err", "LUT vs dequant rel. err")]))
    print("\n## shiftadd on demo:tiny-gpt (group 32, rounds 1; tied head and embedding stay fp32)\n")
    print(_markdown(acc, [("bits", "bits"), ("calibrate", "calibrate rows"), ("weight_error", "weight err"),
                          ("layer_output_error", "layer output err"), ("model_output_error", "model output err"),
                          ("linear_bytes_cut", "linear bytes cut"), ("model_bytes_before", "model B before"),
                          ("model_bytes_after", "model B after")]))
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
