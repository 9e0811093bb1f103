"""Triton codegen backend: lowers rewrite:: custom ops to Triton kernels (templates and generated regions).

Imports rewriter/ only; kernels register as device implementations of the ops defined in rewriter/ops/.
"""
