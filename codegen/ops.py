"""The `rewrite_triton::` custom ops that lowered graphs call (opaque ops with fake impls: they export, save and
load — the loading process must `import codegen` — and run under torch.compile).

    rewrite_triton::lora_linear(x, weight, bias?, lora_a, lora_b, scale, adapter_input?, activation, residual?)
        = act(rewrite::lora_linear(...)) + residual          (templates/lora_linear.py)
    rewrite_triton::two_pass_softmax(x, dim)  = softmax(x, dim)   (templates/softmax.py)
    rewrite_triton::region(inputs, spec)      = the fused region described by the JSON spec   (generate.py)
    rewrite_triton::monarch_linear / blockdiag_linear / lowrank_linear(<the rewrite:: op's arguments>,
        activation="none", residual=None) = act(rewrite::<op>(...)) + residual   (templates/monarch_linear.py,
          blockdiag_linear.py (block-diagonal and low-rank)); the pre-merged dense path (rows ≤ threshold) is one
          F.linear (then the same epilogue), by design, not a fallback
    rewrite_triton::vq_logits / shiftadd_linear / softplus_attention = the rewrite:: op of the same name and
        signature   (templates/vq_logits.py, shiftadd_linear.py, softplus_attention.py)
    rewrite_triton::multi_lora_linear = rewrite::multi_lora_linear (named / mixed-batch adapters; defined in
        templates/lora_batch.py with its kernel)

The epilogue act(·) + residual is one torch helper, codegen/epilogue.py, in every reference, fallback and dense
path; the kernels apply it to their fp32 accumulators before the store.

Which implementation runs (`_run`): where a kernel can run (CUDA, or CPU under TRITON_INTERPRET=1) and the
template takes these inputs, codegen.select chooses among the template's candidates — its Triton configurations
and its aten path — measured on the device on the first call per shape bucket (REWRITE_KERNELS=auto|triton|aten
forces a side); elsewhere the reference runs after a one-line notice. Kernels use opaque custom ops rather than
torch.library.triton_op: exporting a triton_op program fails under the interpreter (FakeTensor data pointer).
"""
from __future__ import annotations

import torch

from . import generate
from . import select
from .runtime import can_launch, notice_fallback, offsets_reason
from .templates import blockdiag_linear as blockdiag_t
from .templates import lora_batch as lora_batch_t
from .templates import lora_linear as lora_t
from .templates import monarch_linear as monarch_t
from .templates import shiftadd_linear as shiftadd_t
from .templates import softmax as softmax_t
from .templates import softplus_attention as softplus_t
from .templates import vq_logits as vq_t

NAMESPACE = "rewrite_triton"


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _run(name: str, refusal, tensors: list, out_numel, candidates, reference, args: tuple):
    """The selected candidate (codegen.select) where the kernel handles these inputs and can run here; else
    `reference()` after a one-line notice (the first per op). `refusal()`: the template's own reason not to take
    these inputs (dtype, layout) or None; `out_numel()`: the output's size (32-bit offsets); `candidates()`: the
    template's candidate list; `args`: the op's arguments.

    Host cost: what only depends on the arguments' shapes, strides, dtypes and devices — the refusal, the offset
    check, the shape bucket — is computed once per signature and memoised, so a repeated call pays a signature,
    two dict lookups and the launch (on a GPU a small kernel takes less time than its Python launch path)."""
    key = (name, _signature(args))
    checked = _CHECKED.get(key)
    if checked is None:
        reason = refusal() or offsets_reason(*tensors, out_numel=out_numel())
        lead = next(t for t in tensors if isinstance(t, torch.Tensor))
        checked = (reason, lead.device, lead.dtype, shape_bucket(name, args) if reason is None else None,
                   can_launch(*tensors))
        if len(_CHECKED) >= 8192:
            _CHECKED.clear()
        _CHECKED[key] = checked
    reason, device, dtype, bucket, launchable = checked
    if reason is None and launchable:
        return select.dispatch(name, candidates(), device, dtype, bucket, fast_key=key)
    notice_fallback(f"rewrite_triton.{name}", reason or "no device for Triton kernels")
    return reference()


# (op, argument signature) -> (refusal or None, device, dtype, shape bucket, whether a kernel can run on them):
# all of it depends only on the signature (can_launch: on the devices in it, Triton and the interpreter flag)
_CHECKED: dict = {}


def _kernel_or_reference(name: str, reason: str | None, tensors: list, out_numel: int, launch, reference):
    """For an op with one launch: selection between `launch()` (its template) and `reference()` (its aten path),
    keyed on the tensors' shapes (the first one's leading dims as rows); the checks of `_run` apply."""
    return _run(name, lambda: reason, tensors, lambda: out_numel,
                lambda: [select.Candidate("triton", "triton", launch), select.Candidate("aten", "aten", reference)],
                reference, tuple(tensors))


def _signature(args) -> tuple:
    """Everything about the arguments the checks depend on: tensors' shapes, strides, dtypes and devices, other
    values as they are (floats as their type: a scale's value changes nothing)."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((a.shape, a.stride(), a.dtype, a.device))
        elif isinstance(a, (list, tuple)):
            sig.append(_signature(a))
        elif isinstance(a, float):
            sig.append(float)
        else:
            sig.append(a)
    return tuple(sig)


# the argument positions whose leading dims are rows (bucketed to a power of two), per op
ROW_ARGS = {"lora_linear": (0, 6, 8), "monarch_linear": (0, 8), "blockdiag_linear": (0, 8),
            "lowrank_linear": (0, 7), "vq_logits": (0,), "shiftadd_linear": (0,), "softplus_attention": (0, 1, 2, 3)}


def shape_bucket(name: str, args: tuple) -> tuple:
    """The shape bucket codegen.select keys a call of rewrite_triton::<name> on, from its arguments in schema
    order (tensors or FakeTensors: the lowering report computes it from a node's metadata)."""
    if name == "two_pass_softmax":
        x, dim = args
        if x.dim() == 0:
            return ()
        dim = dim % x.dim()
        n = x.shape[dim]
        return select.pow2_at_least(x.numel() // n if n else 0), n, dim == x.dim() - 1
    if name == "region":
        inputs, spec = args
        return generate.region_bucket(list(inputs)), spec
    return select.bucket(args, ROW_ARGS.get(name, (0,)))


@torch.library.custom_op("rewrite_triton::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, adapter_input: torch.Tensor | None = None,
                activation: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    args = (x, weight, bias, lora_a, lora_b, scale, adapter_input, activation, residual)
    return _run("lora_linear", lambda: lora_t.supported(x, weight, bias, lora_a, lora_b, adapter_input, residual),
                [x, weight, bias, lora_a, lora_b, adapter_input, residual], lambda: _rows(x) * weight.shape[0],
                lambda: lora_t.candidates(*args), lambda: lora_t.reference(*args), args)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, adapter_input=None, activation="none", residual=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _lora_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, adapter_input, activation, residual = inputs
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, adapter_input, residual)
    ctx.scale, ctx.activation = scale, activation


def _lora_backward(ctx, grad):
    """Gradients by recomputing the forward with torch ops (the kernel is forward-only): cheap next to the GEMMs,
    and exact to the reference formula — epilogue included."""
    saved = ctx.saved_tensors
    wanted = [i for i, t in enumerate(saved) if t is not None and ctx.needs_input_grad[(0, 1, 2, 3, 4, 6, 8)[i]]]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(saved)]
        x, weight, bias, lora_a, lora_b, adapter_input, residual = leaves
        y = lora_t.reference(x, weight, bias, lora_a, lora_b, ctx.scale, adapter_input, ctx.activation, residual)
        grads = torch.autograd.grad(y, [leaves[i] for i in wanted], grad) if wanted else []
    out = [None] * 9
    for i, g in zip(wanted, grads):
        out[(0, 1, 2, 3, 4, 6, 8)[i]] = g
    return tuple(out)


lora_linear.register_autograd(_lora_backward, setup_context=_lora_setup)


@torch.library.custom_op("rewrite_triton::two_pass_softmax", mutates_args=())
def two_pass_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _run("two_pass_softmax", lambda: softmax_t.supported(x), [x], x.numel, lambda: softmax_t.candidates(x, dim),
                lambda: softmax_t.reference(x, dim), (x, dim))


@two_pass_softmax.register_fake
def _(x, dim):
    return torch.empty_like(x)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.dim = inputs[1]


def _softmax_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return y * (grad - (grad * y).sum(ctx.dim, keepdim=True)), None


two_pass_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


@torch.library.custom_op("rewrite_triton::region", mutates_args=())
def region(inputs: list[torch.Tensor], spec: str) -> torch.Tensor:
    s = generate.parse_spec(spec)
    floats_ok = lambda: all(t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.bool)  # noqa: E731
                            for t in inputs)
    inputs = list(inputs)
    return _run("region", lambda: None if floats_ok() else "unsupported dtype", inputs,
                lambda: generate.iteration_shape(inputs).numel(),
                lambda: generate.candidates(inputs, s, spec), lambda: generate.reference(inputs, s), (inputs, spec))


@region.register_fake
def _(inputs, spec):
    s = generate.parse_spec(spec)
    shape = generate.output_shape(s, generate.iteration_shape(inputs))
    return inputs[0].new_empty(shape, dtype=generate.DTYPES[s["dtype"]])


def _region_setup(ctx, inputs, output):
    tensors, spec = inputs
    ctx.save_for_backward(*tensors)
    ctx.spec = spec


def _region_backward(ctx, grad):
    """Recompute the region with its aten ops under autograd (the generated kernel is forward-only)."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in saved]
        y = generate.reference(leaves, generate.parse_spec(ctx.spec))
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True)) if wanted else iter(())
    return [next(grads) if t.requires_grad else None for t in leaves], None


region.register_autograd(_region_backward, setup_context=_region_setup)

def _recompute_autograd(op, reference) -> None:
    """Gradients of a forward-only kernel op: recompute `reference` (torch ops) under autograd for the floating
    tensor inputs that need one. `reference` takes the op's arguments in order (the structured ops' references
    take activation and residual too, so the epilogue — and residual's gradient — is differentiated as well)."""
    def setup(ctx, inputs, output):
        ctx.tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_pos])
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def backward(ctx, grad):
        args, wanted = list(ctx.others), []
        with torch.enable_grad():
            for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
                need = bool(ctx.needs_input_grad[i]) and t.is_floating_point()
                args[i] = t.detach().requires_grad_(need)
                if need:
                    wanted.append(i)
            y = reference(*args)
            grads = torch.autograd.grad(y, [args[i] for i in wanted], grad, allow_unused=True) if wanted else []
        out = [None] * len(args)
        for i, g in zip(wanted, grads):
            out[i] = g
        return tuple(out)

    op.register_autograd(backward, setup_context=setup)


def _dense_path(x, dense, threshold) -> bool:
    return dense is not None and _rows(x) <= threshold


@torch.library.custom_op("rewrite_triton::monarch_linear", mutates_args=())
def monarch_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int, dense: torch.Tensor | None = None, threshold: int = 0,
                   activation: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    epi = (activation, residual)
    if _dense_path(x, dense, threshold):
        return monarch_t.reference(x, w1, w2, bias, out_features, dense, threshold, *epi).contiguous()
    return _run("monarch_linear", lambda: monarch_t.supported(x, w1, w2, bias, residual), [x, w1, w2, bias, residual],
                lambda: _rows(x) * out_features, lambda: monarch_t.candidates(x, w1, w2, bias, out_features, *epi),
                lambda: monarch_t.reference(x, w1, w2, bias, out_features, None, 0, *epi).contiguous(),
                (x, w1, w2, bias, out_features, dense, threshold, *epi))


@monarch_linear.register_fake
def _(x, w1, w2, bias, out_features, dense=None, threshold=0, activation="none", residual=None):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("rewrite_triton::blockdiag_linear", mutates_args=())
def blockdiag_linear(x: torch.Tensor, blocks: torch.Tensor, dense_u: torch.Tensor | None, bias: torch.Tensor | None,
                     out_features: int, dense: torch.Tensor | None = None, threshold: int = 0,
                     activation: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    epi = (activation, residual)
    if _dense_path(x, dense, threshold):
        return blockdiag_t.reference(x, blocks, dense_u, bias, out_features, dense, threshold, *epi).contiguous()
    return _run("blockdiag_linear", lambda: blockdiag_t.supported(x, blocks, dense_u, bias, residual),
                [x, blocks, dense_u, bias, residual], lambda: _rows(x) * out_features,
                lambda: blockdiag_t.candidates(x, blocks, dense_u, bias, out_features, *epi),
                lambda: blockdiag_t.reference(x, blocks, dense_u, bias, out_features, None, 0, *epi).contiguous(),
                (x, blocks, dense_u, bias, out_features, dense, threshold, *epi))


@blockdiag_linear.register_fake
def _(x, blocks, dense_u, bias, out_features, dense=None, threshold=0, activation="none", residual=None):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("rewrite_triton::lowrank_linear", mutates_args=())
def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   dense: torch.Tensor | None = None, threshold: int = 0,
                   activation: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    epi = (activation, residual)
    if _dense_path(x, dense, threshold):
        return blockdiag_t.reference_lowrank(x, u, v, bias, dense, threshold, *epi).contiguous()
    return _run("lowrank_linear", lambda: blockdiag_t.supported(x, u, v, bias, residual), [x, u, v, bias, residual],
                lambda: _rows(x) * u.shape[0], lambda: blockdiag_t.candidates_lowrank(x, u, v, bias, *epi),
                lambda: blockdiag_t.reference_lowrank(x, u, v, bias, None, 0, *epi).contiguous(),
                (x, u, v, bias, dense, threshold, *epi))


@lowrank_linear.register_fake
def _(x, u, v, bias, dense=None, threshold=0, activation="none", residual=None):
    return x.new_empty(*x.shape[:-1], u.shape[0])


@torch.library.custom_op("rewrite_triton::vq_logits", mutates_args=())
def vq_logits(h: torch.Tensor, codebook: torch.Tensor, code_map: torch.Tensor, bias: torch.Tensor | None = None,
              log_softmax: bool = False) -> torch.Tensor:
    args = (h, codebook, code_map, bias, log_softmax)
    return _run("vq_logits", lambda: vq_t.supported(h, codebook, code_map, bias), [h, codebook, code_map, bias],
                lambda: _rows(h) * code_map.shape[0], lambda: vq_t.candidates(*args), lambda: vq_t.reference(*args),
                args)


@vq_logits.register_fake
def _(h, codebook, code_map, bias=None, log_softmax=False):
    return h.new_empty(*h.shape[:-1], code_map.shape[0])


@torch.library.custom_op("rewrite_triton::shiftadd_linear", mutates_args=())
def shiftadd_linear(x: torch.Tensor, signs: torch.Tensor, exponents: torch.Tensor, bias: torch.Tensor | None,
                    in_features: int, group: int, scales: torch.Tensor | None = None,
                    offsets: torch.Tensor | None = None) -> torch.Tensor:
    args = (x, signs, exponents, bias, in_features, group, scales, offsets)
    if not shiftadd_t.lut_pays_off(_rows(x), signs):
        return shiftadd_t.reference(*args)      # by design, not a fallback: many rows → dequantised GEMM
    return _run("shiftadd_linear", lambda: shiftadd_t.supported(*args), [x, signs, exponents, bias, scales, offsets],
                lambda: _rows(x) * signs.shape[1], lambda: shiftadd_t.candidates(*args),
                lambda: shiftadd_t.reference(*args),
                args)


@shiftadd_linear.register_fake
def _(x, signs, exponents, bias, in_features, group, scales=None, offsets=None):
    return x.new_empty(*x.shape[:-1], signs.shape[1])


@torch.library.custom_op("rewrite_triton::softplus_attention", mutates_args=())
def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool, reweight: bool, p: float, train_len: int, eps: float,
                       gain: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    args = (q, k, v, mask, is_causal, reweight, p, train_len, eps, gain, bias)
    return _run("softplus_attention", lambda: softplus_t.supported(q, k, v, mask, gain, bias),
                [q, k, v, mask, gain, bias],
                lambda: q.numel() // max(q.shape[-1], 1) * v.shape[-1], lambda: softplus_t.candidates(*args),
                lambda: softplus_t.reference(*args), args)


@softplus_attention.register_fake
def _(q, k, v, mask, is_causal, reweight, p, train_len, eps, gain=None, bias=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


_recompute_autograd(monarch_linear, monarch_t.reference)
_recompute_autograd(softplus_attention, softplus_t.reference)
_recompute_autograd(blockdiag_linear, blockdiag_t.reference)
_recompute_autograd(lowrank_linear, blockdiag_t.reference_lowrank)
_recompute_autograd(vq_logits, vq_t.reference)
_recompute_autograd(shiftadd_linear, shiftadd_t.reference)

LORA = torch.ops.rewrite_triton.lora_linear.default
SOFTMAX = torch.ops.rewrite_triton.two_pass_softmax.default
REGION = torch.ops.rewrite_triton.region.default
MONARCH = torch.ops.rewrite_triton.monarch_linear.default
BLOCKDIAG = torch.ops.rewrite_triton.blockdiag_linear.default
LOWRANK = torch.ops.rewrite_triton.lowrank_linear.default
VQ_LOGITS = torch.ops.rewrite_triton.vq_logits.default
SHIFTADD = torch.ops.rewrite_triton.shiftadd_linear.default
SOFTPLUS_ATTENTION = torch.ops.rewrite_triton.softplus_attention.default
MULTI_LORA = lora_batch_t.OP


def register_cuda_kernels() -> list[str]:
    """Make each Triton kernel the CUDA implementation of the rewrite:: op it lowers, so a program that was never
    lowered (exported, saved, or under torch.compile) runs the kernels on a GPU once `codegen` is imported.

    Each rewrite:: op gets its rewrite_triton:: twin, so the same codegen.select choice applies: the measured
    fastest of the template's candidates and its aten path (REWRITE_KERNELS forces a side), and the reference for
    what the kernel does not handle (e.g. float64). Autograd stays the rewrite:: op's own formula (the Autograd
    key sits above the CUDA key). Returns the ops registered."""
    import rewriter.ops  # noqa: F401  (defines the rewrite:: ops)

    def lora_kernel(x, weight, bias, lora_a, lora_b, scale, adapter_input=None):
        return LORA(x, weight, bias, lora_a, lora_b, scale, adapter_input)

    twins = {"lora_linear": lora_kernel, "two_pass_softmax": SOFTMAX, "monarch_linear": MONARCH,
             "blockdiag_linear": BLOCKDIAG, "lowrank_linear": LOWRANK, "vq_logits": VQ_LOGITS,
             "shiftadd_linear": SHIFTADD, "softplus_attention": SOFTPLUS_ATTENTION, "multi_lora_linear": MULTI_LORA}
    registered = []
    for name, kernel in twins.items():
        if hasattr(torch.ops.rewrite, name):
            torch.library.register_kernel(f"rewrite::{name}", "cuda", kernel)
            registered.append(f"rewrite::{name}")
    return registered


CUDA_KERNELS = register_cuda_kernels()
