"""Writing programs: atomically (temp file in the same folder, then rename), never over the input, streaming.

torch.export.save writes the archive one record per weight storage (a bytes copy of that storage, then the
record); with a weight store (rewriter/lazy_weights.py) the pages of each weight are handed back right after its
record is written, so saving a program of S bytes does not leave S resident: peak ≈ the largest tensor twice.

torch.export.save/load does not keep tied weights tied (a tied LM head loads as a second tensor), so the groups of
state-dict names that share one tensor are written beside the program (`rewrite_ties.json` in the archive) and
`tie_weights` restores them when rewriter loads the file.
"""
from __future__ import annotations

import contextlib
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
    """Call write(tmp_path), then move tmp_path onto path; on any failure the old file is left as it was.

    tmp_path has the final file name, inside a hidden temporary folder next to `path` (same file system, so the
    move is atomic): writers that record the name they write to — torch.export.save names the archive's root
    folder after the file — record the final one."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder} does not exist")
    tmp_dir = tempfile.mkdtemp(prefix=".rewrite-", dir=folder)
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.rmdir(tmp_dir)


def save_program(program: torch.export.ExportedProgram, path: str, *, source: str | None = None,
                 store=None) -> None:
    if not path.endswith(".pt2"):
        raise UserError(f"output {path} must end with .pt2 (a torch.export program)")
    if source is not None and not source.startswith("demo:") and same_file(source, path):
        raise UserError(f"refusing to overwrite the input {source}; choose another -o path")
    ties = tied_groups(program.state_dict)
    extra = {TIES_FILE: json.dumps(ties)} if ties else None

    def write(tmp):
        governed = store.governed() if store is not None else contextlib.nullcontext()
        with governed, _release_after_each_record(store):
            torch.export.save(program, tmp, extra_files=extra)
    atomic_write(path, write)
    if store is not None:
        store.release()


@contextlib.contextmanager
def _release_after_each_record(store):
    """While torch.export.save runs, hand back each weight's pages once its bytes are taken for the archive.

    torch (2.11–2.13) reads every weight through `torch.export.pt2_archive._package._get_raw_tensor_bytes`; it is
    wrapped for the duration of the save. Where that function does not exist (another torch), the save runs as
    is and the pages go back when it ends — the same file, more resident memory meanwhile."""
    if store is None:
        yield
        return
    try:
        from torch.export.pt2_archive import _package
        original = _package._get_raw_tensor_bytes
    except (ImportError, AttributeError):
        yield
        return

    def raw_bytes_then_release(value):
        data = original(value)
        store.release_tensor(value)
        return data

    _package._get_raw_tensor_bytes = raw_bytes_then_release
    try:
        yield
    finally:
        _package._get_raw_tensor_bytes = original


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
