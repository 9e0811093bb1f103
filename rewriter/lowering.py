"""`codegen=...`: lower custom ops to generated kernels. The backends live in codegen/ and register themselves."""
from __future__ import annotations

import importlib

from .errors import UserError

BACKENDS = {"triton": "codegen"}


def register_backends() -> None:
    """Import every available codegen backend so its ops are registered (needed to load a lowered program)."""
    for module_name in BACKENDS.values():
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass


def lower(gm, inputs, backend: str, report, *, dump_dir: str | None = None) -> None:
    if backend not in BACKENDS:
        raise UserError(f'unknown codegen backend "{backend}"; available: {", ".join(BACKENDS)}')
    module = importlib.import_module(BACKENDS[backend])
    if not hasattr(module, "lower"):
        raise UserError(f'codegen backend "{backend}" is not available yet')
    module.lower(gm, inputs, report, dump_dir=dump_dir)
