"""Writing programs: atomically (temp file in the same folder, then rename), never over the input."""
from __future__ import annotations

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
    atomic_write(path, lambda tmp: torch.export.save(program, tmp))
