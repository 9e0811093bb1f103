"""Kernel source cache: generated Triton source is written to a file and imported (the JIT reads a kernel's
source from its file, so exec'd strings are rejected).

    key  = sha256(source, CODEGEN_VERSION, triton.__version__)[:16]
    file = <cache dir>/k_<key>.py      cache dir: $REWRITE_KERNEL_CACHE or ~/.cache/rewrite/kernels

Files are written atomically (temp file in the same directory + os.replace), so concurrent processes never
import a half-written kernel. Loaded modules are memoised per process.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

CODEGEN_VERSION = "1"

_LOADED: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    env = os.environ.get("REWRITE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rewrite" / "kernels"


def kernel_key(source: str) -> str:
    import triton
    h = hashlib.sha256()
    for part in (source, CODEGEN_VERSION, triton.__version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_source(source: str) -> ModuleType:
    """Import `source` as a module from the cache dir (written there first if missing)."""
    key = kernel_key(source)
    if key in _LOADED:
        return _LOADED[key]
    path = cache_dir() / f"k_{key}.py"
    if not path.exists() or path.read_text() != source:
        write_atomic(path, source)
    name = f"rewrite_kernel_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _LOADED[key] = module
    return module


def dump(dump_dir, name: str, source: str) -> Path:
    """Write one kernel's source to `dump_dir/name.py` (for --dump-kernels)."""
    path = Path(dump_dir) / f"{name}.py"
    write_atomic(path, source)
    return path
