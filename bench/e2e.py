"""End to end: a GPT forward — base, each pass on the PyTorch path, each pass lowered with kernel selection, and
torch.compile of the base — side by side in one run.

    python -m bench.e2e [--small] [--passes SPEC ...] [--dtype float16 ...] [--no-compile] [--json]

Model: rewriter.demo_models.TinyGPT (token + position embedding, pre-LN blocks with hand-written causal softmax
attention, GELU MLP, head tied to the embedding). Default (a GPU): 4 layers, d 2048, 16 heads, vocab 32,000, batch
4 × 1,024 tokens, fp16 and bf16. --small: 2 layers, d 128, 4 heads, vocab 512, batch 2 × 64 tokens, fp32 on the
CPU (with TRITON_INTERPRET=1 the lowered variants run the kernels in the interpreter; without it they run the
ops' reference after a notice — the harness runs either way).

Per dtype and pass (default: lora{rank=16}, monarch{blocks=4}, softplus-attn, two-pass-softmax, vq-logits):
    base              the eager model
    compile           torch.compile(base) (inductor, default mode)
    <pass> aten       the rewritten program, REWRITE_KERNELS=aten: its rewrite:: ops on their PyTorch path
    <pass> lowered    rewrite(..., codegen="triton"): rewrite_triton ops (fused epilogues, generated regions),
                      each dispatching to what codegen.select measured fastest on this device
The passes run once on the CPU in fp32 with small example inputs (dynamic shapes, so the program takes the
benchmark's batch), then the program is moved to the device and cast to the dtype. Figures: ms per forward
(p50 of do_bench on a GPU; median of interleaved rounds on the CPU) and the ratio to base. The issue's goal: with
selection no model runs slower than its aten path by more than 5 %.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

# data-free projections (calibrate=0): this bench times programs, and their speed does not depend on the fit
DEFAULT_PASSES = ["lora{rank=16}", "monarch{blocks=4,exclude=lm_head,calibrate=0}", "softplus-attn",
                  "two-pass-softmax", "vq-logits{codes=1024,iters=3,calibrate=0}"]
SMALL_PASSES = ["lora{rank=4}", "monarch{blocks=4,exclude=lm_head,calibrate=0}", "softplus-attn", "two-pass-softmax",
                "vq-logits{codes=32,iters=3,calibrate=0}"]
FULL = dict(vocab=32000, dim=2048, heads=16, layers=4, batch=4, tokens=1024)
SMALL = dict(vocab=512, dim=128, heads=4, layers=2, batch=2, tokens=64)


def build(config: dict):
    """(fp32 CPU model, small example args for the passes, the benchmark's input ids)."""
    from rewriter.demo_models import TinyGPT
    torch.manual_seed(0)
    model = TinyGPT(vocab=config["vocab"], dim=config["dim"], heads=config["heads"], layers=config["layers"],
                    max_len=2 * config["tokens"]).eval()      # > tokens: export guards t ≠ max_len
    g = torch.Generator().manual_seed(1)
    example = (torch.randint(0, config["vocab"], (2, 16), generator=g),)
    ids = torch.randint(0, config["vocab"], (config["batch"], config["tokens"]), generator=g)
    return model, example, ids


@contextlib.contextmanager
def kernels_mode(mode: str | None):
    """REWRITE_KERNELS set to `mode` within (None: leave it)."""
    old = os.environ.get("REWRITE_KERNELS")
    if mode is not None:
        os.environ["REWRITE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("REWRITE_KERNELS", None)
        else:
            os.environ["REWRITE_KERNELS"] = old


def rewritten(model, example, spec: str):
    """The pass's program (an ExportedProgram, fp32, CPU) and the seconds the rewrite took."""
    from rewriter import rewrite
    start = time.perf_counter()
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        result = rewrite(model, example, passes=spec, dynamic=True)
    return result.program, time.perf_counter() - start


def on_device(program, device: torch.device, dtype: torch.dtype):
    """A fresh unlifted GraphModule of `program` on `device` in `dtype`. Off the CPU the program is moved with
    torch.export's move_to_device_pass first: its graph holds the devices it was exported on (an arange of
    positions on the CPU, say), which moving the module's weights alone leaves behind."""
    import copy
    program = copy.deepcopy(program)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass
        program = move_to_device_pass(program, str(device))
    return program.module().to(device=device, dtype=dtype)


def lowered(gm, example):
    """`gm` (on its device and dtype) lowered to rewrite_triton ops; the sites' selection summaries."""
    import copy

    import codegen
    from rewriter.pass_manager import Report
    gm = copy.deepcopy(gm)
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        result = codegen.lower(gm, list(example), Report())
    return gm, [(s["kernel"], s["impl"]) for s in result.sites]


def _check(got, want, spec):
    """The lowered program computes what the aten path does (to the dtype's accuracy, relative to the largest
    logit): a bench of a wrong program would be worthless."""
    scale = want.float().abs().max().item() or 1.0
    err = (got.float() - want.float()).abs().max().item() / scale
    tol = 1e-3 if want.dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise AssertionError(f"{spec}: lowered program differs from its aten path by {err:.3g} of the largest "
                             f"logit (> {tol})")


def timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        def cuda_time(fns: dict) -> dict:
            out = {}
            for name, fn in fns.items():
                with kernels_mode("aten" if name.endswith(" aten") else None):
                    fn()                # the first call measures and caches the selection
                    out[name] = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
            return out
        return cuda_time
    from bench.common import time_side_by_side

    def cpu_time(fns: dict) -> dict:
        wrapped = {}
        for name, fn in fns.items():
            def run(fn=fn, mode="aten" if name.endswith(" aten") else None):
                with kernels_mode(mode):
                    return fn()
            wrapped[name] = run
        return time_side_by_side(wrapped, repeats=5, stat="median")
    return cpu_time


def prepare(config: dict, passes: list[str], log=print):
    """The model, its example and benchmark inputs, and each pass's program (rewritten once, fp32 on the CPU)."""
    model, example, ids = build(config)
    programs = {}
    for spec in passes:
        programs[spec] = rewritten(model, example, spec)
        log(f"  rewrote {spec} in {programs[spec][1]:.1f} s")
    return model, example, ids, programs


def run(config: dict, passes: list[str], dtypes: list, device: torch.device, compile_base: bool = True,
        log=print, prepared=None) -> list[dict]:
    model, example, ids, programs = prepared or prepare(config, passes, log)
    rows = []
    ids_d = ids.to(device)
    example_d = tuple(t.to(device) for t in example)
    time_fns = timer(device)
    for dtype in dtypes:
        base = __import__("copy").deepcopy(model).to(device=device, dtype=dtype)
        fns = {"base": lambda base=base: base(ids_d)}
        if compile_base:
            compiled = torch.compile(base)
            fns["compile"] = lambda compiled=compiled: compiled(ids_d)
        sites = {}
        for spec, (program, _) in programs.items():
            gm_d = on_device(program, device, dtype)
            low, site_impls = lowered(gm_d, example_d)
            sites[spec] = site_impls
            with torch.no_grad(), kernels_mode("aten"):
                want = gm_d(ids_d)
            with torch.no_grad():
                got = low(ids_d)
            _check(got, want, spec)
            fns[f"{spec} aten"] = lambda gm_d=gm_d: gm_d(ids_d)
            fns[f"{spec} lowered"] = lambda low=low: low(ids_d)
        with torch.no_grad():
            seconds = time_fns(fns)
        for name, s in seconds.items():
            spec = name.rsplit(" ", 1)[0] if name not in ("base", "compile") else None
            row = dict(variant=name, dtype=str(dtype).replace("torch.", ""), ms=s * 1e3,
                       vs_base=s / seconds["base"])
            if name.endswith(" lowered"):
                row["vs_aten"] = s / seconds[f"{spec} aten"]
                row["sites"] = sites[spec]
            rows.append(row)
            log(f"  {row['dtype']:9s} {name:45s} {row['ms']:9.2f} ms  {row['vs_base']:.2f}× base"
                + (f"  {row['vs_aten']:.2f}× its aten path" if "vs_aten" in row else ""))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a small model on the CPU (a smoke run of the harness)")
    ap.add_argument("--passes", action="append", help="pass spec (repeatable); default: the five above")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], action="append")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the base")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (progress on stderr)")
    ap.add_argument("--out", metavar="FILE.jsonl", help="also append each dtype's rows to FILE as JSON lines as soon "
                    "as they are measured")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.small
    if not cuda and not args.small:
        print("bench.e2e: needs a CUDA GPU for the default size; --small runs a small model on the CPU",
              file=sys.stderr)
        return 2
    import codegen  # noqa: F401  (registers the kernels and the rewrite_triton ops)
    from bench.common import machine
    config = SMALL if args.small else FULL
    passes = args.passes or (SMALL_PASSES if args.small else DEFAULT_PASSES)
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else \
        ([torch.float32] if args.small else [torch.float16, torch.bfloat16])
    device = torch.device("cuda" if cuda else "cpu")
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    log(f"# bench.e2e — {machine()}; GPT {config}")
    rows = []
    prepared = prepare(config, passes, log)
    for dtype in dtypes:        # one dtype at a time, so --out keeps what finished if the run is cut short
        got = run(config, passes, [dtype], device, compile_base=not args.no_compile, log=log, prepared=prepared)
        rows += got
        if args.out:
            with open(args.out, "a") as f:
                for r in got:
                    f.write(json.dumps(dict(r, machine=machine(), config=config)) + "\n")
    if args.json:
        print(json.dumps(dict(machine=machine(), config=config, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
