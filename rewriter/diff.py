"""`rewrite show MODEL` and `rewrite diff A B`: summaries and differences of saved programs.

Unlike the pipeline view (rewriter/report.py, built from change records), this compares two programs that may
come from anywhere: op counts, parameters by name (added, removed, reshaped, changed values), totals of
parameters and FLOPs, and — when both take the same inputs — the output error of B against A.
"""
from __future__ import annotations

import torch
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import cost
from .capture import Captured
from .report import _delta
from .verify import flat_inputs, propagate_shapes, relative_error, run_graph


def summarize(captured: Captured) -> dict:
    gm = captured.gm
    inputs = flat_inputs(captured.args, captured.kwargs)
    propagate_shapes(gm, inputs)
    return {
        "source": captured.source,
        "inputs": [f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in inputs if isinstance(t, torch.Tensor)],
        "ops": dict(cost.op_counts(gm).most_common()),
        "params": cost.program_params(gm),
        "flops": cost.program_flops(gm),
        "nodes": len(gm.graph.nodes),
    }


def render_summary(summary: dict, console: Console) -> None:
    table = Table(show_edge=False, box=None, header_style="bold dim")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in summary["ops"].items():
        table.add_row(op, str(n))
    params = summary["params"]
    head = Text(f"inputs {', '.join(summary['inputs'])}\n", style="dim")
    head.append(f"params {cost.format_count(params.get('params', 0))} "
                f"(trainable {cost.format_count(params.get('trainable', 0))}, "
                f"buffers {cost.format_count(params.get('buffers', 0))}, {cost.format_count(params.get('bytes', 0))}B)   "
                f"FLOPs {cost.format_count(summary['flops'])}   nodes {summary['nodes']}")
    console.print(Panel(Group(head, table), title=summary["source"], title_align="left", expand=False))


def diff_programs(a: Captured, b: Captured) -> dict:
    sa, sb = summarize(a), summarize(b)
    ops = sorted(set(sa["ops"]) | set(sb["ops"]))
    op_changes = {op: (sa["ops"].get(op, 0), sb["ops"].get(op, 0)) for op in ops
                  if sa["ops"].get(op, 0) != sb["ops"].get(op, 0)}
    state_a = dict(a.gm.named_parameters()) | dict(a.gm.named_buffers())
    state_b = dict(b.gm.named_parameters()) | dict(b.gm.named_buffers())
    params = {"added": [], "removed": [], "reshaped": [], "changed": []}
    for name, t in state_b.items():
        if name not in state_a:
            params["added"].append((name, list(t.shape), str(t.dtype).replace("torch.", "")))
    for name, t in state_a.items():
        if name not in state_b:
            params["removed"].append((name, list(t.shape), str(t.dtype).replace("torch.", "")))
        elif state_b[name].shape != t.shape or state_b[name].dtype != t.dtype:
            params["reshaped"].append((name, list(t.shape), list(state_b[name].shape)))
        elif not torch.equal(state_b[name], t):
            params["changed"].append((name, list(t.shape), str(t.dtype).replace("torch.", "")))
    error = None
    inputs_a = flat_inputs(a.args, a.kwargs)
    if sa["inputs"] == sb["inputs"]:
        error = relative_error(run_graph(a.gm, inputs_a), run_graph(b.gm, inputs_a))
    return {"a": sa, "b": sb, "ops": op_changes, "params": params, "error": error}


def render_diff(d: dict, console: Console) -> None:
    lines = []
    for op, (na, nb) in d["ops"].items():
        style, sign = ("green", "+") if nb > na else ("red", "−")
        line = Text(f"  {sign} {op}", style=style)
        line.append(f"  {na} → {nb}", style="dim")
        lines.append(line)
    if not d["ops"]:
        lines.append(Text("  same ops", style="dim"))
    for kind, sign, style in (("removed", "−", "red"), ("added", "+", "green"), ("reshaped", "~", "yellow"),
                              ("changed", "~", "yellow")):
        items = d["params"][kind]
        for item in items[:6]:
            line = Text(f"  {sign} {item[0]}", style=style)
            detail = f"{item[1]} → {item[2]}" if kind == "reshaped" else f"{item[2]}{item[1]}"
            line.append(f"  {detail}" + ("  (values)" if kind == "changed" else ""), style="dim")
            lines.append(line)
        if len(items) > 6:
            lines.append(Text(f"    … {len(items) - 6} more {kind}", style="dim"))
    a, b = d["a"], d["b"]
    totals = Table(show_header=False, box=None, pad_edge=False)
    totals.add_column(style="bold")
    totals.add_column()
    totals.add_row("params", _delta(a["params"].get("params", 0), b["params"].get("params", 0)))
    totals.add_row("bytes", _delta(a["params"].get("bytes", 0), b["params"].get("bytes", 0)))
    totals.add_row("FLOPs", _delta(a["flops"], b["flops"]))
    totals.add_row("output error", "inputs differ" if d["error"] is None else f"{d['error']:.3g}")
    console.print(Panel(Group(*lines, totals), title=f"{a['source']} → {b['source']}", title_align="left",
                        expand=False))
