"""`rewrite::two_pass_softmax(Tensor x, int dim) -> Tensor` — softmax by the two-pass algorithm of
Dukhan & Ablavatski ("The two-pass softmax algorithm", 2020; XNNPACK).

Every eˣ is kept as a (mantissa, exponent) pair that cannot overflow:

    eˣ = p · 2ⁿ,   n = round(x · log₂e),   p = exp(x − n·ln2) ∈ [e^(−ln2/2), e^(ln2/2)]

    pass 1  (S_m, S_e) = (0, −∞);  for each element:  e′ = max(S_e, n);  S_m = S_m·2^(S_e−e′) + p·2^(n−e′);  S_e = e′
    pass 2  yᵢ = pᵢ / S_m · 2^(nᵢ − S_e)

No max pass and no overflow: the input is read twice and the output written once (three-pass softmax reads it
three times). The pass-1 update is associative, so the reduction may be done in any order; this reference does
it as one reduction over the row: S_e = max n, S_m = Σ p·2^(n − S_e) — the same (mantissa, exponent) sum, combined
as a tree instead of left to right. A kernel (codegen/) fuses it into one sweep.

Precision (the contract of the `two-pass-softmax` pass, checked by tests/test_attention.py against a float64
softmax on every dtype, under every ATen CPU capability): the result is the float64 value rounded once to the
input's dtype, so |y − y_ref| ≤ ε·y_ref + τ elementwise (≤ 1 ulp: half an ulp of rounding plus ~1e-15 relative
from the float64 arithmetic), ε the unit roundoff of the dtype (fp32 2⁻²⁴, fp16 2⁻¹¹, bf16 2⁻⁸) and τ its
smallest normal (outputs that underflow are exact only to the subnormal spacing, as with torch.softmax).
Why float64 inside: with fp32 mantissas the error budget is exp's own error (Sleef's expf: ≤ 1 ulp, i.e. up to
2ε relative) in pᵢ, the same again averaged into S_m, the summation error of S_m (which grows with the row length
and depends on the reduction order ATen picks for a strided dim and a CPU capability), and the division's
rounding: 4 ulp can be exceeded (hypothesis found 4.09 ulp on a 30-wide fp32 row, where torch.softmax fp32 is
itself 5.2 ulp off). In float64 every one of those terms is ~10⁻¹⁵ and only the final rounding remains. The
Triton kernel (codegen/templates/softmax.py) keeps fp32 mantissas for speed and is tested against its own
tolerance; this op is the reference the `two-pass-softmax` pass's exact contract is stated for.
How:
- mantissas p, their sum S_m and the quotient are float64 for every input dtype; the result is rounded once,
- exponent bookkeeping (n, S_e, 2^(n−S_e)) is exact integer arithmetic in float64; the range reduction
  t = x − n·ln2 uses a Cody–Waite split of ln2, off by at most ~2⁻⁵³·|x|. Beyond ~2³¹ distinct float32 values
  are ≥ 256 apart, a row is one-hot or exact ties, and t is clamped to [−1, 1] so the error in p cancels in p/S_m,
- special values match torch.softmax: −∞ entries give 0; a row of only −∞ gives NaN (0/0, as torch); a row
  holding +∞ or NaN gives NaN; a length-1 row gives 1.
"""
from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
# Cody–Waite split of ln2 (fdlibm): LN2_HI has 32 significant bits, so n·LN2_HI is exact for |n| < 2²¹
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10


@torch.library.custom_op("rewrite::two_pass_softmax", mutates_args=())
def two_pass_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return reference(x, dim)


def mantissa_exponent(x: torch.Tensor):
    """(p, n) with eˣ = p·2ⁿ: p and n float64 (n integers, ±∞ kept)."""
    xd = x.to(torch.float64)
    n = torch.round(xd * LOG2E)
    finite = torch.isfinite(n)
    t = torch.where(finite, (xd - n * LN2_HI) - n * LN2_LO, torch.zeros_like(xd)).clamp(-1.0, 1.0)
    p = torch.exp(t)
    # x = −∞ contributes nothing; x = +∞ or NaN poison the row (NaN), as exp(x − max) does in torch.softmax
    p = torch.where(n == -math.inf, torch.zeros_like(p), p)
    p = torch.where(torch.isnan(xd) | (n == math.inf), torch.full_like(p, math.nan), p)
    return p, n


def accumulate(p: torch.Tensor, n: torch.Tensor, dim: int):
    """Pass 1: the (S_m, S_e) pair of a row, S_m·2^S_e = Σ pᵢ·2^nᵢ."""
    s_e = torch.amax(torch.where(torch.isnan(n), torch.full_like(n, -math.inf), n), dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(s_e), n - s_e, torch.full_like(n, -math.inf))
    s_m = torch.sum(p * torch.exp2(shift.clamp(min=-1100.0)).to(p.dtype), dim=dim, keepdim=True)
    return s_m, s_e


def reference(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.dim() == 0:
        x1 = reference(x.reshape(1), 0)
        return x1.reshape(())
    dim = dim % x.dim()
    p, n = mantissa_exponent(x)
    s_m, s_e = accumulate(p, n, dim)
    # pass 2: yᵢ = pᵢ / S_m · 2^(nᵢ − S_e)   (an all −∞ row has S_e = −∞ and S_m = 0: 0/0 = NaN, as torch)
    scale = torch.exp2((n - s_e).clamp(min=-1100.0)).to(p.dtype)
    y = (p / s_m) * scale
    y = torch.where(torch.isfinite(s_e), y, torch.full_like(y, math.nan))
    return y.to(x.dtype)


@two_pass_softmax.register_fake
def _(x, dim):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    # d softmax: yᵢ·(gᵢ − Σⱼ gⱼyⱼ), in fp32 for low-precision inputs
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf, gf = y.to(acc), grad.to(acc)
    gx = yf * (gf - (gf * yf).sum(ctx.dim, keepdim=True))
    return gx.to(y.dtype), None


two_pass_softmax.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.rewrite.two_pass_softmax.default


def flops(node):
    """~6 per element: multiply, round, fma, exp, scale-add (pass 1) and scale-divide (pass 2)."""
    x = node.args[0].meta["val"]
    return 6 * x.numel()
