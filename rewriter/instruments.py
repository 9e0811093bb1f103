"""Pass instruments (TVM's PassInstrument): --time-passes, --print-after, --dump-dir."""
from __future__ import annotations

import os
import time

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from .pass_manager import Instrument


class TimePasses(Instrument):
    def __init__(self):
        self.rows = []
        self._start = 0.0

    def before_pass(self, p, gm):
        self._start = time.perf_counter()

    def after_pass(self, p, gm, result, index):
        self.rows.append((p.spec(), time.perf_counter() - self._start, result.seconds))

    def render(self, console: Console) -> None:
        table = Table(title="pass timing", title_justify="left")
        table.add_column("pass")
        table.add_column("total s", justify="right")
        table.add_column("rewrite s", justify="right")
        table.add_column("checks s", justify="right")
        for spec, total, rewrite_s in self.rows:
            table.add_row(spec, f"{total:.3f}", f"{rewrite_s:.3f}", f"{total - rewrite_s:.3f}")
        console.print(table)


class PrintAfter(Instrument):
    """Print the graph's code after the named passes ("all" for every pass), only when the pass changed it."""

    def __init__(self, names: set[str], console: Console):
        self.names = names
        self.console = console

    def after_pass(self, p, gm, result, index):
        if result.changed and ("all" in self.names or p.name in self.names):
            self.console.rule(f"after {p.spec()}")
            self.console.print(Syntax(gm.code.strip(), "python", word_wrap=True))


class DumpDir(Instrument):
    """Write NNN_<pass>.py (the graph's code) after every pass, and 000_input.py before the first."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self._first = True

    def before_pass(self, p, gm):
        if self._first:
            self._write("000_input.py", gm.code)
            self._first = False

    def after_pass(self, p, gm, result, index):
        self._write(f"{index + 1:03d}_{p.name.replace('-', '_')}.py", gm.code)

    def _write(self, name, text):
        with open(os.path.join(self.folder, name), "w") as f:
            f.write(text)
