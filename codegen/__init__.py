"""Triton codegen backend: lowers rewrite:: custom ops to Triton kernels (templates and generated regions).

Imports rewriter/ only. Importing this package registers the `rewrite_triton::` ops that lowered programs call,
so a saved lowered program loads after `import rewriter, codegen`, and registers each kernel as the CUDA
implementation of its rewrite:: op, so programs that were never lowered run the kernels on a GPU too.

    codegen.lower(gm, inputs, report, dump_dir=None)   the hook used by `rewrite(..., codegen="triton")`
    templates/lora_linear.py    fused LoRA GEMM (+ GELU / residual epilogue)
    templates/softmax.py        two-pass (mantissa, exponent) softmax, row and looped kernels
    templates/monarch_linear.py     Monarch (P₁/P₂ folded into addressing)
    templates/blockdiag_linear.py   block-diagonal / BlockDense / low-rank linear
    templates/vq_logits.py          fused code logits + gather (+ log-softmax)
    templates/shiftadd_linear.py    BCQ LUT GEMV/GEMM
    templates/softplus_attention.py flash-style LSSA / LSSAR
    regions.py, pointwise_table.py, generate.py   fused pointwise/reduction regions → generated kernels
    cache.py                    generated source → file (atomic) → import
"""
from . import ops  # noqa: F401  (registers rewrite_triton::)
from .lower import lower

__all__ = ["lower"]
