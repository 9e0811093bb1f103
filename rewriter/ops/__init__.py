"""Custom ops for rewritten layers, one module per op (schema, reference implementation, fake impl, autograd).

Importing this package registers every op under the `rewrite::` namespace, so a saved program that uses them
loads after `import rewriter`. Each op module exposes:

    OP         the OpOverload (e.g. torch.ops.rewrite.lora_linear.default)
    reference  a function of plain aten ops computing the same thing (used by `--decompose` and tests)
    flops      flops(node) -> int | sympy.Expr, from the FakeTensors on the node's inputs

Kernel backends (codegen/) register device implementations of these ops; the ops never import them.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

NAMESPACE = "rewrite"

_MODULES: dict[str, ModuleType] = {}


def _load_all() -> dict[str, ModuleType]:
    if not _MODULES:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                _MODULES[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return _MODULES


def op_modules() -> dict[str, ModuleType]:
    """op name -> module, for every custom op of this package."""
    return _load_all()


def module_for(target) -> ModuleType | None:
    """The op module defining `target` (an OpOverload), or None for ops that are not ours."""
    for module in _load_all().values():
        if getattr(module, "OP", None) is target:
            return module
    return None


_load_all()
