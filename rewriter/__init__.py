"""rewrite — a graph-rewriting compiler for efficient PyTorch models.

    from rewriter import rewrite
    result = rewrite(model, (x,), passes="lora{rank=8},lora-merge", verify=True)
    result.program      # torch.export.ExportedProgram
    result.module()     # callable
    result.report       # what each pass changed, FLOPs, params, errors

    torch.compile(model, backend=rewriter.backend("lora-merge"))
"""
from __future__ import annotations


from . import ops  # noqa: E402,F401  (registers rewrite:: custom ops, needed to load saved programs)
from .api import RewriteResult, rewrite  # noqa: E402
from .compile_backend import backend  # noqa: E402
from .errors import RewriteError, UserError, VerificationError  # noqa: E402
from .pass_base import Contract, Pass, parse_pipeline, print_pipeline  # noqa: E402

__all__ = ["rewrite", "RewriteResult", "backend", "Pass", "Contract", "parse_pipeline", "print_pipeline",
           "RewriteError", "UserError", "VerificationError"]
__version__ = "0.1.0"
