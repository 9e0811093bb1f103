"""Writing programs: atomically (temp file in the same folder, then rename), never over the input.

torch.export.save/load does not keep tied weights tied (a tied LM head loads as a second tensor), so the groups of
state-dict names that share one tensor are written beside the program (`rewrite_ties.json` in the archive) and
`tie_weights` restores them when rewriter loads the file.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from .errors import UserError


def same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then move tmp_path onto path; on any failure the old file is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".rewrite-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_program(program: torch.export.ExportedProgram, path: str, *, source: str | None = None) -> None:
    if not path.endswith(".pt2"):
        raise UserError(f"output {path} must end with .pt2 (a torch.export program)")
    if source is not None and not source.startswith("demo:") and same_file(source, path):
        raise UserError(f"refusing to overwrite the input {source}; choose another -o path")
    ties = tied_groups(program.state_dict)
    extra = {TIES_FILE: json.dumps(ties)} if ties else None
    atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))


TIES_FILE = "rewrite_ties.json"


def tied_groups(state_dict: dict) -> list[list[str]]:
    """Groups (≥ 2 names) of state-dict entries that are one tensor."""
    groups: dict[int, list[str]] = {}
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor):
            groups.setdefault(id(t), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def tie_weights(program: torch.export.ExportedProgram, text: str) -> int:
    """Make the names of each saved group share one tensor again; returns how many names were re-tied."""
    count = 0
    for names in json.loads(text) if text else []:
        first = program.state_dict.get(names[0])
        for name in names[1:]:
            other = program.state_dict.get(name)
            if isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor) and \
                    other.shape == first.shape and other.dtype == first.dtype and torch.equal(other, first):
                program.state_dict[name] = first
                count += 1
    return count
