"""Forward time of a dense FFN against its monarch / blockdiag / lowrank rewrites, side by side in one run.

    .venv/bin/python -m bench.structured_ffn                # 1024→4096→1024 and 2048→8192→2048, tokens 1/16/512
    .venv/bin/python -m bench.structured_ffn --quick        # 1024→4096→1024 only, fewer repeats, small projection
    .venv/bin/python -m bench.structured_ffn --compile      # also torch.compile'd dense vs monarch
    .venv/bin/python -m bench.structured_ffn --json         # figures as JSON on stdout
    .venv/bin/python -m bench.structured_ffn --program      # only the saved-program table (below)

FFN: y = fc2(gelu(fc1(x))). Each rewrite replaces both layers by the custom op the pass emits, with the factor
shapes the pass produces (monarch blocks=4; BlockDense blocks=4 with inner width d/4; low rank r = d/4); factor
values don't change timings, so they are random. Timings: best of interleaved repeats (every variant runs once
per round; --median for medians), torch.set_num_threads(2) by default. "speed-up" = dense time / rewrite time; "FLOP ratio" = dense
FLOPs / rewrite FLOPs. Also: the pre-merge crossover (largest token count at which the dense product beats the
Monarch factors, per layer shape) and the projection time of a 4096×16384 weight (Monarch blocks=4, BlockDense).

Saved-program table (`program_table`): the path users run — each FFN (dense and the three rewrites, with the
rewrite:: ops the passes emit) exported, `torch.export.save`d, loaded back with `torch.export.load(...).module()`
and called on a (1, tokens, d) batch — against the dense FFN as an eager nn.Module, next to the op called
directly; the issue's goal for Monarch at 2048→8192→2048, 512 tokens: ≥ 2.8× dense through the saved program.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import rewriter  # noqa: F401  (registers the rewrite:: ops)
from rewriter.projections import blockdense_project, monarch_project, monarch_sizes
from bench.common import time_side_by_side

OPS = torch.ops.rewrite


def _layer_factors(kind: str, m: int, n: int, gen: torch.Generator) -> dict:
    b = 4
    if kind == "monarch":
        p, q, s = monarch_sizes(m, n, b)
        return {"w1": torch.randn(b, q, p, generator=gen) / p ** 0.5, "w2": torch.randn(b, s, q, generator=gen) / q ** 0.5}
    r = min(m, n) // 4
    if kind == "blockdiag":
        t = r // b
        return {"blocks": torch.randn(b, t, n // b, generator=gen), "u": torch.randn(m, r, generator=gen) / r ** 0.5}
    return {"u": torch.randn(m, r, generator=gen) / r ** 0.5, "v": torch.randn(r, n, generator=gen) / n ** 0.5}


def _layer_call(kind: str, f: dict, bias: torch.Tensor, m: int, dense=None, threshold=0):
    if kind == "dense":
        return lambda x: F.linear(x, f["w"], bias)
    if kind == "monarch":
        return lambda x: OPS.monarch_linear(x, f["w1"], f["w2"], bias, m, dense, threshold)
    if kind == "blockdiag":
        return lambda x: OPS.blockdiag_linear(x, f["blocks"], f["u"], bias, m, dense, threshold)
    return lambda x: OPS.lowrank_linear(x, f["u"], f["v"], bias, dense, threshold)


def _layer_flops(kind: str, f: dict, m: int, n: int) -> int:
    if kind == "dense":
        return 2 * m * n
    if kind == "monarch":
        b, q, p = f["w1"].shape
        return 2 * q * (b * p + b * f["w2"].shape[1])
    if kind == "blockdiag":
        b, t, p = f["blocks"].shape
        return 2 * b * t * p + 2 * m * b * t
    return 2 * f["u"].shape[1] * (m + n)


def build_ffn(kind: str, d: int, hidden: int, gen: torch.Generator):
    """(callable x -> y, FLOPs per token, parameter count)."""
    layers = []
    flops = params = 0
    for n, m in ((d, hidden), (hidden, d)):
        f = {"w": torch.randn(m, n, generator=gen) / n ** 0.5} if kind == "dense" else _layer_factors(kind, m, n, gen)
        bias = torch.zeros(m)
        layers.append(_layer_call(kind, f, bias, m))
        flops += _layer_flops(kind, f, m, n)
        params += sum(v.numel() for v in f.values())
    fc1, fc2 = layers
    return (lambda x: fc2(F.gelu(fc1(x)))), flops, params


def ffn_table(shapes, tokens_list, repeats, compile_too: bool, stat: str = "min") -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    kinds = ("dense", "monarch", "blockdiag", "lowrank")
    for d, hidden in shapes:
        built = {k: build_ffn(k, d, hidden, gen) for k in kinds}
        fns = {k: v[0] for k, v in built.items()}
        if compile_too:
            fns["dense+compile"] = torch.compile(built["dense"][0])
            fns["monarch+compile"] = torch.compile(built["monarch"][0])
        for tokens in tokens_list:
            x = torch.randn(tokens, d, generator=gen)
            times = time_side_by_side({k: (lambda f=f: f(x)) for k, f in fns.items()}, repeats, stat)
            row = {"ffn": f"{d}->{hidden}->{d}", "tokens": tokens, "dense_ms": times["dense"] * 1e3}
            for k in kinds[1:]:
                row[f"{k}_ms"] = times[k] * 1e3
                row[f"{k}_speedup"] = times["dense"] / times[k]
                row[f"{k}_flop_ratio"] = built["dense"][1] / built[k][1]
                row[f"{k}_param_ratio"] = built[k][2] / built["dense"][2]
            if compile_too:
                row["compiled_speedup"] = times["dense+compile"] / times["monarch+compile"]
                row["dense_compile_ms"] = times["dense+compile"] * 1e3
            rows.append(row)
    return rows


def crossover(shapes, tokens_list, repeats, stat: str = "min") -> list[dict]:
    """Per layer shape: time of the Monarch op on its factors vs the pre-merged dense product, by token count."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for n, m in shapes:
        f = _layer_factors("monarch", m, n, gen)
        dense_w = torch.randn(m, n, generator=gen)
        bias = torch.zeros(m)
        fns = {"factors": _layer_call("monarch", f, bias, m),
               "dense": _layer_call("monarch", f, bias, m, dense=dense_w, threshold=1 << 30)}
        per = {}
        for tokens in tokens_list:
            xt = torch.randn(tokens, n, generator=gen)
            times = time_side_by_side({k: (lambda f=f: f(xt)) for k, f in fns.items()}, repeats, stat)
            per[tokens] = times["factors"] / times["dense"]
        best = 0   # largest token count up to which the dense product wins at every measured count
        for tokens in tokens_list:
            if per[tokens] <= 1:
                break
            best = tokens
        out.append({"layer": f"{n}->{m}", "dense_wins_up_to_tokens": best,
                    "factors_over_dense_time": {str(k): round(v, 3) for k, v in per.items()}})
    return out


class _FFN(torch.nn.Module):
    """y = fc2(gelu(fc1(x))) with each layer a dense F.linear or the rewrite:: op with the pass's factor shapes."""

    def __init__(self, kind: str, d: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.kind, self.sizes = kind, []
        for i, (n, m) in enumerate(((d, hidden), (hidden, d))):
            f = {"w": torch.randn(m, n, generator=gen) / n ** 0.5} if kind == "dense" else \
                _layer_factors(kind, m, n, gen)
            for k, v in f.items():
                self.register_parameter(f"l{i}_{k}", torch.nn.Parameter(v, requires_grad=False))
            self.register_parameter(f"l{i}_bias", torch.nn.Parameter(torch.zeros(m), requires_grad=False))
            self.sizes.append(m)

    def layer(self, i, x):
        p = lambda k: getattr(self, f"l{i}_{k}")  # noqa: E731
        m = self.sizes[i]
        if self.kind == "dense":
            return F.linear(x, p("w"), p("bias"))
        if self.kind == "monarch":
            return OPS.monarch_linear(x, p("w1"), p("w2"), p("bias"), m)
        if self.kind == "blockdiag":
            return OPS.blockdiag_linear(x, p("blocks"), p("u"), p("bias"), m)
        return OPS.lowrank_linear(x, p("u"), p("v"), p("bias"))

    def forward(self, x):
        return self.layer(1, F.gelu(self.layer(0, x)))


def saved_program(module: torch.nn.Module, x: torch.Tensor):
    """`module` exported on x, saved to a .pt2 file and loaded back as a user does: torch.export.load(f).module()."""
    import os
    import tempfile
    program = torch.export.export(module, (x,))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ffn.pt2")
        torch.export.save(program, path)
        return torch.export.load(path).module()


def program_table(shapes, tokens_list, repeats, stat: str = "min") -> list[dict]:
    """Per FFN shape and token count: the dense eager FFN vs each rewrite as a saved and loaded program and as the
    op called directly (the same parameters), side by side."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for d, hidden in shapes:
        modules = {k: _FFN(k, d, hidden, gen).eval() for k in ("dense", "monarch", "blockdiag", "lowrank")}
        for tokens in tokens_list:
            x = torch.randn(1, tokens, d, generator=gen)
            programs = {k: saved_program(m, x) for k, m in modules.items()}
            fns = {"dense": lambda: modules["dense"](x)}
            for k in ("monarch", "blockdiag", "lowrank"):
                fns[f"{k}_program"] = lambda k=k: programs[k](x)
                fns[f"{k}_op"] = lambda k=k: modules[k](x)
            fns["dense_program"] = lambda: programs["dense"](x)
            times = time_side_by_side(fns, repeats, stat)
            row = {"ffn": f"{d}->{hidden}->{d}", "tokens": tokens, "dense_ms": times["dense"] * 1e3,
                   "dense_program_ms": times["dense_program"] * 1e3}
            for k in ("monarch", "blockdiag", "lowrank"):
                row[f"{k}_program_ms"] = times[f"{k}_program"] * 1e3
                row[f"{k}_program_speedup"] = times["dense"] / times[f"{k}_program"]
                row[f"{k}_op_speedup"] = times["dense"] / times[f"{k}_op"]
            rows.append(row)
    return rows


def projection_time(m: int, n: int) -> dict:
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    monarch_project(w, 4)
    t_monarch = time.perf_counter() - t0
    t0 = time.perf_counter()
    blockdense_project(w, 4, min(m, n) // 4)
    t_bd = time.perf_counter() - t0
    return {"weight": f"{n}x{m} (in x out)", "monarch_blocks4_s": t_monarch, "blockdense_blocks4_s": t_bd}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-projection", action="store_true")
    ap.add_argument("--median", action="store_true", help="median instead of best round")
    ap.add_argument("--program", action="store_true", help="only the saved-program table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stat = "median" if args.median else "min"
    if args.program:
        shapes = [(1024, 4096)] if args.quick else [(1024, 4096), (2048, 8192)]
        rows = program_table(shapes, [16, 512], 5 if args.quick else 7, stat)
        if args.json:
            print(json.dumps({"stat": stat, "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "program": rows}, indent=2))
            return
        print(f"## Saved and loaded programs vs the dense eager FFN, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, {stat} of interleaved rounds (speed-up over dense; the op called directly "
              f"in brackets)\n")
        print("| FFN | tokens | dense ms | dense program ms | monarch | blockdense | lowrank |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            cells = [r["ffn"], str(r["tokens"]), f"{r['dense_ms']:.3f}", f"{r['dense_program_ms']:.3f}"]
            cells += [f"{r[k + '_program_speedup']:.2f}× ({r[k + '_op_speedup']:.2f}×)"
                      for k in ("monarch", "blockdiag", "lowrank")]
            print("| " + " | ".join(cells) + " |")
        print("\n```json\n" + json.dumps(rows) + "\n```")
        return
    shapes = [(1024, 4096)] if args.quick else [(1024, 4096), (2048, 8192)]
    repeats = 5 if args.quick else 11
    rows = ffn_table(shapes, [1, 16, 512], repeats, args.compile, stat)
    cross = crossover([(1024, 4096), (256, 1024), (64, 256)], [1, 2, 4, 8, 16, 32, 64], repeats, stat)
    proj = None if args.no_projection else (projection_time(4096, 1024) if args.quick
                                            else projection_time(16384, 4096))
    result = {"stat": stat, "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "ffn": rows, "pre_merge": cross, "projection": proj}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"## Structured FFN forward, eager, {result['threads']} threads, torch {torch.__version__}, "
          f"{'median' if args.median else 'best'} of {repeats} interleaved rounds\n")
    head = "| FFN | tokens | dense ms | " + " | ".join(
        f"{k} ms | {k} speed-up (FLOP ratio)" for k in ("monarch", "blockdiag", "lowrank"))
    if args.compile:
        head += " | torch.compile: dense / monarch time"
    print(head + " |")
    print("|" + "---|" * (head.count("|") ) )
    for r in rows:
        cells = [r["ffn"], str(r["tokens"]), f"{r['dense_ms']:.3f}"]
        for k in ("monarch", "blockdiag", "lowrank"):
            cells += [f"{r[k + '_ms']:.3f}", f"{r[k + '_speedup']:.2f}x ({r[k + '_flop_ratio']:.2f}x)"]
        if args.compile:
            cells.append(f"{r['compiled_speedup']:.2f}x")
        print("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    print(f"\nparams vs dense: monarch {r0['monarch_param_ratio']:.3f}, blockdiag {r0['blockdiag_param_ratio']:.3f}, "
          f"lowrank {r0['lowrank_param_ratio']:.3f}")
    print("\n## Pre-merge crossover (Monarch factors time / dense product time; > 1: dense is faster)\n")
    for c in cross:
        print(f"- {c['layer']}: dense wins up to {c['dense_wins_up_to_tokens']} tokens; "
              f"{c['factors_over_dense_time']}")
    if proj:
        print(f"\n## Projection time, {proj['weight']}: Monarch blocks=4 {proj['monarch_blocks4_s']:.1f} s, "
              f"BlockDense blocks=4 {proj['blockdense_blocks4_s']:.1f} s")
    print("\n```json\n" + json.dumps(result) + "\n```")


if __name__ == "__main__":
    main()
