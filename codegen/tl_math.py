"""Portable math helpers for kernels (no libdevice: works on triton 3.6, 3.9 and the interpreter).

    erf(x)   Abramowitz–Stegun 7.1.26: 1 − (a₁t + … + a₅t⁵)·e^(−x²), t = 1/(1 + p|x|), odd extension;
             max abs. error 1.5e-7 — below fp32 tolerance of the exact contract (1e-5).
    tanh(x)  |x| < 0.25: odd Taylor series to x⁹ (error < 1e-9 rel.);
             else sign(x)·(1 − e^(−2|x|))/(1 + e^(−2|x|))
             (no cancellation there: 1 − e^(−0.5) = 0.39).
Inputs are fp32 (kernels upcast right after every load).
"""
import triton
import triton.language as tl


@triton.jit
def erf(x):
    ax = tl.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - poly * tl.exp(-ax * ax)
    return tl.where(x < 0, -y, y)


@triton.jit
def tanh(x):
    ax = tl.abs(x)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.25, small, big)


@triton.jit
def gelu_erf(x):
    return 0.5 * x * (1.0 + erf(x * 0.7071067811865476))


@triton.jit
def gelu_tanh(x):
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
