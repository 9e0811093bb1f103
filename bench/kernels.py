"""GPU benchmarks of the codegen kernels, each against its baseline measured side by side in one run.

    python -m bench.kernels [--quick] [--json]

    lora      fused LoRA linear (one Triton kernel) vs the base linear alone and vs the unmerged adapter as PEFT
              runs it (base(x) + lora_B(lora_A(x))·s: three GEMMs and an add). Goal: fused ≤ 1.1× base.
    softmax   two-pass softmax kernel vs torch.softmax, effective GB/s (one read + one write of the tensor; the
              looped kernel for long rows reads twice), and vs a plain copy of the same tensor (the device's
              read+write bandwidth; goal: two-pass ≥ 90 % of it).
    region    a generated pointwise+reduction kernel (codegen.lower of an exported function) vs eager and vs
              torch.compile (inductor).
    monarch   Monarch kernel (permutations folded into addressing) vs the op's torch.bmm reference (two bmm's
              and permute copies) vs the dense cuBLAS linear of the same size.
    shiftadd  BCQ LUT GEMV/GEMM kernel (3 bit planes, group 128) vs the fp16 dense GEMV (cuBLAS) and vs the op's
              reference (dequantise, then matmul), at batch 1 (and 16 in the full run).
    attention softplus attention kernel (LSSA, causal, flash-style tiling) vs SDPA (causal, the flash kernel) and vs
              the op's torch reference (the T × T weights materialised).
    vq        fused VQ-logits kernel (code logits + gather) vs the dense LM head (V × d) and vs the op's
              reference (code logits, then index_select).

Timings: triton.testing.do_bench, p50 (p20–p80 in the JSON), after a correctness check of every variant.
Needs a CUDA GPU: without one it prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def _bench(fn) -> tuple[float, float, float]:
    import triton.testing
    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def bench_lora(quick: bool, dtype, device="cuda", sizes=None) -> list[dict]:
    from codegen.templates import lora_linear as lora_t
    d, r = (2048, 16) if quick else (4096, 16)
    tokens = [1024, 4096] if quick else [256, 1024, 4096, 8192]
    if sizes is not None:
        (d, r), tokens = sizes
    rows = []
    for m in tokens:
        x = torch.randn(m, d, device=device, dtype=dtype)
        w = torch.randn(d, d, device=device, dtype=dtype) / d ** 0.5
        b = torch.randn(d, device=device, dtype=dtype)
        a = torch.randn(r, d, device=device, dtype=dtype) / d ** 0.5
        bb = torch.randn(d, r, device=device, dtype=dtype) / r ** 0.5
        s = 2.0
        base = lambda: F.linear(x, w, b)  # noqa: E731
        peft = lambda: F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * s  # noqa: E731
        fused = lambda: lora_t.launch(x, w, b, a, bb, s)  # noqa: E731
        torch.testing.assert_close(fused().float(), peft().float(), rtol=2e-2, atol=2e-2)
        tb, tp, tf = _bench(base), _bench(peft), _bench(fused)
        rows.append(dict(bench="lora", shape=f"{m}x{d}->{d} r{r}", dtype=str(dtype).replace("torch.", ""),
                         base_ms=tb[0], peft_ms=tp[0], fused_ms=tf[0], peft_vs_base=tp[0] / tb[0],
                         fused_vs_base=tf[0] / tb[0], quantiles=dict(base=tb, peft=tp, fused=tf)))
    return rows


def bench_softmax(quick: bool, dtype, device="cuda", sizes=None) -> list[dict]:
    from codegen.templates import softmax as softmax_t
    shapes = [(4096, 1024), (1024, 32768)] if quick else [(8192, 512), (4096, 1024), (4096, 4096),
                                                           (1024, 16384), (256, 131072)]
    shapes = sizes or shapes
    rows = []
    for rws, n in shapes:
        x = torch.randn(rws, n, device=device, dtype=dtype) * 4
        torch.testing.assert_close(softmax_t.launch(x, -1).float(), torch.softmax(x.float(), -1),
                                   rtol=1e-2, atol=1e-4)
        y = torch.empty_like(x)
        tc = _bench(lambda: y.copy_(x))
        tt = _bench(lambda: torch.softmax(x, -1))
        tk = _bench(lambda: softmax_t.launch(x, -1))
        gb = 2 * x.numel() * x.element_size() / 1e9
        rows.append(dict(bench="softmax", shape=f"{rws}x{n}", dtype=str(dtype).replace("torch.", ""),
                         copy_ms=tc[0], torch_ms=tt[0], twopass_ms=tk[0], copy_gbps=gb / (tc[0] / 1e3),
                         torch_gbps=gb / (tt[0] / 1e3), twopass_gbps=gb / (tk[0] / 1e3),
                         twopass_vs_torch=tk[0] / tt[0], twopass_of_copy_bw=tc[0] / tk[0],
                         looped=n > softmax_t.max_row_block()))
    return rows


class _Epilogue(torch.nn.Module):
    def forward(self, x, b, res):
        y = F.gelu(x * 0.5 + b) + res
        return (y * y).sum(-1), y


class _Pointwise(torch.nn.Module):
    def forward(self, x, b, res):
        return torch.sigmoid(x + b) * res - torch.tanh(res)


def bench_region(quick: bool, dtype, device="cuda", sizes=None, inductor=True) -> list[dict]:
    import codegen
    from rewriter.pass_manager import Report
    shapes = [(4096, 1024)] if quick else [(4096, 1024), (16384, 4096)]
    shapes = sizes or shapes
    rows = []
    for module in (_Pointwise(), _Epilogue()):
        for m, n in shapes:
            x = torch.randn(m, n, device=device, dtype=dtype)
            b = torch.randn(n, device=device, dtype=dtype)
            res = torch.randn(m, n, device=device, dtype=dtype)
            args = (x, b, res)
            gm = torch.export.export(module, args).module()
            result = codegen.lower(gm, list(args), Report())
            assert result.sites, "nothing was lowered"
            compiled = torch.compile(module) if inductor else module
            want = module(*args)
            for got in (gm(*args), compiled(*args)):
                for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                    torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
            te, ti, tg = _bench(lambda: module(*args)), _bench(lambda: compiled(*args)), _bench(lambda: gm(*args))
            rows.append(dict(bench="region", shape=f"{type(module).__name__[1:]} {m}x{n}",
                             dtype=str(dtype).replace("torch.", ""), kernels=len(result.sites),
                             eager_ms=te[0], inductor_ms=ti[0], generated_ms=tg[0],
                             generated_vs_inductor=tg[0] / ti[0], generated_vs_eager=tg[0] / te[0]))
    return rows


def bench_monarch(quick: bool, dtype, device="cuda", sizes=None) -> list[dict]:
    from codegen.templates import monarch_linear as mon_t
    from rewriter.ops import monarch_linear as mon_op
    d, nb = 4096, 64                       # b = √d: the paper's square Monarch, p = q = s = 64
    tokens = [1024, 4096] if quick else [16, 1024, 4096, 16384]
    configs = [(d, nb, m) for m in tokens] + ([] if quick else [(4096, 16, 4096), (1024, 32, 4096)])
    rows = []
    for d, nb, m in (sizes or configs):
        p = d // nb
        x = torch.randn(m, d, device=device, dtype=dtype)
        w1 = torch.randn(nb, p, p, device=device, dtype=dtype) / p ** 0.5
        w2 = torch.randn(nb, p, p, device=device, dtype=dtype) / p ** 0.5
        b = torch.randn(d, device=device, dtype=dtype)
        w = torch.randn(d, d, device=device, dtype=dtype) / d ** 0.5
        ref = lambda: mon_op.reference(x, w1, w2, b, d)  # noqa: E731
        kern = lambda: mon_t.launch(x, w1, w2, b, d)  # noqa: E731
        dense = lambda: F.linear(x, w, b)  # noqa: E731
        torch.testing.assert_close(kern().float(), ref().float(), rtol=2e-2, atol=2e-2)
        tr, tk, td = _bench(ref), _bench(kern), _bench(dense)
        rows.append(dict(bench="monarch", shape=f"{m}x{d} b{nb}", dtype=str(dtype).replace("torch.", ""),
                         dense_ms=td[0], bmm_ms=tr[0], kernel_ms=tk[0], kernel_vs_bmm=tk[0] / tr[0],
                         kernel_vs_dense=tk[0] / td[0], quantiles=dict(dense=td, bmm=tr, kernel=tk)))
    return rows


def bench_shiftadd(quick: bool, dtype, device="cuda", sizes=None) -> list[dict]:
    from codegen.templates import shiftadd_linear as sa_t
    from rewriter.ops import shiftadd_linear as sa_op
    q, group = 3, 128
    configs = [(4096, 4096, 1)] if quick else [(4096, 4096, 1), (4096, 11008, 1), (11008, 4096, 1), (4096, 4096, 16)]
    rows = []
    for n_in, n_out, m in (sizes or configs):
        groups = -(-n_in // group)
        # timing does not depend on the values: random packed planes and exponents (a real quantiser run on
        # 4096² weights takes minutes and is benchmarked in bench/shiftadd.py)
        signs = torch.randint(0, 256, (q, n_out, groups * group // 8), dtype=torch.uint8, device=device)
        exps = torch.randint(-9, -4, (n_out, groups, q, 1), dtype=torch.int8, device=device)
        x = torch.randn(m, n_in, device=device, dtype=dtype)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype) / n_in ** 0.5
        lut = lambda: sa_t.launch(x, signs, exps, None, n_in, group)  # noqa: E731
        ref = lambda: sa_op.reference(x, signs, exps, None, n_in, group)  # noqa: E731
        gemv = lambda: F.linear(x, w)  # noqa: E731
        torch.testing.assert_close(lut().float(), ref().float(), rtol=2e-2, atol=2e-2)
        tl_, tr, tg = _bench(lut), _bench(ref), _bench(gemv)
        rows.append(dict(bench="shiftadd", shape=f"{m}x{n_in}->{n_out} q{q} g{group}",
                         dtype=str(dtype).replace("torch.", ""), fp16_gemv_ms=tg[0], dequant_ms=tr[0], lut_ms=tl_[0],
                         lut_vs_fp16=tl_[0] / tg[0], lut_vs_dequant=tl_[0] / tr[0],
                         weight_bytes_ratio=(signs.numel() + exps.numel()) / (w.numel() * w.element_size()),
                         quantiles=dict(gemv=tg, dequant=tr, lut=tl_)))
    return rows


def bench_vq(quick: bool, dtype, device="cuda", sizes=None) -> list[dict]:
    from codegen.templates import vq_logits as vq_t
    from rewriter.ops import vq_logits as vq_op
    configs = [(1, 768, 50257, 1024), (512, 768, 50257, 1024)] if quick else \
        [(1, 768, 50257, 1024), (64, 768, 50257, 1024), (512, 768, 50257, 1024), (2048, 4096, 32000, 2048)]
    rows = []
    for m, d, vocab, k in (sizes or configs):
        h = torch.randn(m, d, device=device, dtype=dtype)
        head = torch.randn(vocab, d, device=device, dtype=dtype) / d ** 0.5
        codebook = torch.randn(k, d, device=device, dtype=dtype) / d ** 0.5
        code_map = torch.randint(0, k, (vocab,), device=device, dtype=torch.int32)
        dense = lambda: F.linear(h, head)  # noqa: E731
        fused = lambda: vq_t.launch(h, codebook, code_map)  # noqa: E731
        ref = lambda: vq_op.reference(h, codebook, code_map)  # noqa: E731
        torch.testing.assert_close(fused().float(), ref().float(), rtol=2e-2, atol=2e-2)
        td, tf, tr = _bench(dense), _bench(fused), _bench(ref)
        rows.append(dict(bench="vq", shape=f"{m}x{d} V{vocab} K{k}", dtype=str(dtype).replace("torch.", ""),
                         dense_ms=td[0], reference_ms=tr[0], fused_ms=tf[0], fused_vs_dense=tf[0] / td[0],
                         fused_vs_reference=tf[0] / tr[0], quantiles=dict(dense=td, reference=tr, fused=tf)))
    return rows


def bench_attention(quick: bool, dtype, device="cuda", sizes=None) -> list[dict]:
    from codegen.templates import softplus_attention as sp_t
    from rewriter.ops import softplus_attention as sp_op
    configs = [(4, 16, 1024, 64)] if quick else [(4, 16, 1024, 64), (2, 16, 4096, 64), (1, 16, 8192, 128)]
    rows = []
    for bsz, heads, t, d in (sizes or configs):
        q, k, v = (torch.randn(bsz, heads, t, d, device=device, dtype=dtype) for _ in range(3))
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        kern = lambda: sp_t.launch(q, k, v, None, True, False, 15.0, 0, 1e-6)  # noqa: E731
        ref = lambda: sp_op.reference(q, k, v, None, True, False, 15.0, 0, 1e-6)  # noqa: E731
        torch.testing.assert_close(kern().float(), ref().float(), rtol=2e-2, atol=2e-2)
        ts, tk, tr = _bench(sdpa), _bench(kern), _bench(ref)
        rows.append(dict(bench="attention", shape=f"{bsz}x{heads}x{t}x{d} causal",
                         dtype=str(dtype).replace("torch.", ""), sdpa_ms=ts[0], reference_ms=tr[0], kernel_ms=tk[0],
                         kernel_vs_sdpa=tk[0] / ts[0], kernel_vs_reference=tk[0] / tr[0],
                         quantiles=dict(sdpa=ts, reference=tr, kernel=tk)))
    return rows


BENCHES = {"lora": bench_lora, "softmax": bench_softmax, "region": bench_region, "monarch": bench_monarch,
           "shiftadd": bench_shiftadd, "vq": bench_vq, "attention": bench_attention}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--only", choices=list(BENCHES), action="append")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels: needs a CUDA GPU (Triton kernels are timed on the device); none found", file=sys.stderr)
        return 2
    import triton

    from bench.common import machine, markdown_table
    wanted = args.only or list(BENCHES)
    results = []
    for dtype in (torch.float16, torch.bfloat16) if not args.quick else (torch.float16,):
        for name, fn in BENCHES.items():
            if name in wanted and not (name == "shiftadd" and dtype != torch.float16):   # fp16 GEMV baseline
                results += fn(args.quick, dtype)
    if args.json:
        print(json.dumps(dict(machine=machine(), triton=triton.__version__, results=results), indent=1))
        return 0
    print(f"# bench.kernels — {machine()}, triton {triton.__version__}\n")
    for name, cols in (("lora", ["shape", "dtype", "base_ms", "peft_ms", "fused_ms", "peft_vs_base",
                                 "fused_vs_base"]),
                       ("softmax", ["shape", "dtype", "copy_gbps", "torch_gbps", "twopass_gbps", "twopass_vs_torch",
                                    "twopass_of_copy_bw", "looped"]),
                       ("region", ["shape", "dtype", "kernels", "eager_ms", "inductor_ms", "generated_ms",
                                   "generated_vs_inductor"]),
                       ("monarch", ["shape", "dtype", "dense_ms", "bmm_ms", "kernel_ms", "kernel_vs_bmm",
                                    "kernel_vs_dense"]),
                       ("shiftadd", ["shape", "dtype", "fp16_gemv_ms", "dequant_ms", "lut_ms", "lut_vs_fp16",
                                     "lut_vs_dequant"]),
                       ("vq", ["shape", "dtype", "dense_ms", "reference_ms", "fused_ms", "fused_vs_dense",
                               "fused_vs_reference"]),
                       ("attention", ["shape", "dtype", "sdpa_ms", "reference_ms", "kernel_ms", "kernel_vs_sdpa",
                                      "kernel_vs_reference"])):
        sel = [r for r in results if r["bench"] == name]
        if sel:
            print(f"## {name}\n")
            print(markdown_table(cols, [[r[c] for c in cols] for r in sel]))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
