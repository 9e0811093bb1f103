"""Rendering what the passes changed: a rich console view (80 columns) and JSON.

The view is built from the change records the pass manager keeps (nodes added/removed with the rule that made
them, parameters added/removed/changed, FLOPs and parameter totals, verification errors) — not from text dumps.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import sympy
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .cost import format_count, simplify


def _jsonable(value):
    if isinstance(value, sympy.Basic):
        value = simplify(value)
        return value if isinstance(value, int) else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def report_to_json(report) -> dict:
    data = _jsonable(dataclasses.asdict(report))
    for p, result in zip(data["passes"], report.passes):
        p["changed"] = result.changed
    return data


def _delta(before, after) -> str:
    before, after = simplify(before), simplify(after)
    if isinstance(before, sympy.Basic) or isinstance(after, sympy.Basic):
        return f"{format_count(before)} → {format_count(after)}"
    if not before:
        return f"{format_count(before)} → {format_count(after)}"
    ratio = (after - before) / before * 100
    return f"{format_count(before)} → {format_count(after)} ({ratio:+.1f}%)"


def _error_text(result) -> Text:
    if result.error_vs_previous is None:
        return Text("not verified (use --verify)", style="dim")
    err = result.error_vs_previous
    if result.tolerance is not None:
        ok = err <= result.tolerance
        return Text(f"{err:.2g} ≤ {result.tolerance:.0e} ✓" if ok else f"{err:.2g} > {result.tolerance:.0e} ✗",
                    style="green" if ok else "bold red")
    return Text(f"{err:.3g} (vs original {result.error_vs_original:.3g}, {result.contract})", style="yellow")


def _group_nodes(changes, sign: str, style: str) -> list[Text]:
    counts = Counter((c.op, c.rule) for c in changes)
    lines = []
    for (op, rule), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0])):
        line = Text(f"  {sign} ", style=style)
        line.append(f"{op}", style=style)
        line.append(f" ×{n}")
        if rule:
            line.append(f"  [{rule}]", style="dim")
        lines.append(line)
    return lines


def _group_params(changes, sign: str, style: str, limit: int = 4) -> list[Text]:
    lines = []
    for c in changes[:limit]:
        line = Text(f"  {sign} ", style=style)
        line.append(c.name, style=style)
        line.append(f"  {c.dtype}{list(c.shape)}" + ("  trainable" if c.trainable else ""), style="dim")
        lines.append(line)
    if len(changes) > limit:
        lines.append(Text(f"    … {len(changes) - limit} more", style="dim"))
    return lines


def _sites_table(result) -> Table | None:
    sites = result.sites
    if not sites:
        return None
    keys = []
    for s in sites:
        for k in s:
            if k not in ("site", "status") and k not in keys:
                keys.append(k)
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    table.add_column("layer", no_wrap=True)
    table.add_column("status")
    keys = ([k for k in keys if k == "reason"] + [k for k in keys if k != "reason"])[:4]  # skip reasons first
    for k in keys:
        table.add_column(k.replace("_", " "), justify="right", overflow="fold")
    for s in sites[:40]:
        row = [s["site"], Text(s["status"], style="green" if s["status"] == "rewritten" else "yellow")]
        for k in keys:
            v = s.get(k, "")
            row.append(f"{v:.3g}" if isinstance(v, float) else format_count(v) if isinstance(v, int)
                       and not isinstance(v, bool) else str(v))
        table.add_row(*row)
    if len(sites) > 40:
        table.add_row(f"… {len(sites) - 40} more", "")
    return table


def render_report(report, console: Console, *, title: str = "", show_sites: bool = True) -> None:
    """The rich diff of a pipeline run."""
    blocks = []
    for i, r in enumerate(report.passes, 1):
        head = Text(f"{i}. {r.spec}", style="bold")
        head.append(f"  {r.contract}", style="cyan")
        if r.skipped:
            head.append(f"  skipped: {r.skipped}", style="yellow")
            blocks.append(head)
            continue
        head.append(f"  {r.seconds:.2f}s", style="dim")
        lines = [head]
        if not r.changed:
            lines.append(Text("  (no change)", style="dim"))
        lines += _group_nodes(r.nodes_removed, "−", "red")
        lines += _group_nodes(r.nodes_added, "+", "green")
        lines += _group_params(r.params_removed, "−", "red")
        lines += _group_params(r.params_added, "+", "green")
        lines += _group_params(r.params_changed, "~", "yellow")
        for names, what in ((r.params_frozen, "frozen"), (r.params_unfrozen, "made trainable")):
            if names:
                lines.append(Text(f"  {len(names)} parameters {what}", style="dim"))
        summary = Text("  params ")
        summary.append(_delta(r.params_before.get("params", 0), r.params_after.get("params", 0)))
        summary.append("   FLOPs ")
        summary.append(_delta(r.flops_before, r.flops_after))
        lines.append(summary)
        err = Text("  error ")
        err.append_text(_error_text(r))
        lines.append(err)
        for m in r.messages:
            lines.append(Text(f"  {m}", style="dim"))
        blocks.append(Group(*lines))
        if show_sites:
            table = _sites_table(r)
            if table is not None:
                blocks.append(table)
    totals = Table(show_header=False, box=None, pad_edge=False)
    totals.add_column(style="bold")
    totals.add_column()
    totals.add_row("params", _delta(report.params_before.get("params", 0), report.params_after.get("params", 0)))
    totals.add_row("trainable", _delta(report.params_before.get("trainable", 0),
                                       report.params_after.get("trainable", 0)))
    totals.add_row("bytes", _delta(report.params_before.get("bytes", 0), report.params_after.get("bytes", 0)))
    totals.add_row("FLOPs", _delta(report.flops_before, report.flops_after))
    if report.verified:
        totals.add_row("verified", Text(f"output error vs original {report.error:.3g}",
                                        style="green" if report.error is not None and report.error < 1e-3 else "yellow"))
    blocks.append(totals)
    console.print(Panel(Group(*blocks), title=title or "rewrite", title_align="left", expand=False))
