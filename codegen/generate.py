"""Generated kernels for fused pointwise regions ending in at most one last-dim reduction.

A region is described by a JSON `spec` (the argument of the `rewrite_triton::region` op, so a saved program
carries everything needed to regenerate its kernel):

    {"ops": [{"rule": "mul", "args": ["i0", 0.125], "kw": {}}, {"rule": "masked_fill", "args": ["v0", "i1", -inf]}],
     "reduce": null | "sum" | "max" | "mean", "keepdim": false, "dtype": "float32"}

"iK" is input K, "vJ" the value of op J, numbers are literals; the last op is the region's result (then reduced).
The iteration space is broadcast(inputs) viewed as (R rows, C = last dim). Each program owns BLOCK_R rows and
walks the columns in BLOCK_C chunks; leading dims are unravelled from the row index so broadcast (stride 0) and
non-contiguous inputs are read in place. Values are fp32 (loads upcast at once); masked lanes are excluded from
reductions with tl.where (0 for sum/mean, −∞ for max). The output is written contiguous.
"""
from __future__ import annotations

import functools
import json

import torch
import triton

from . import cache
from .pointwise_table import BY_NAME, REDUCTION_OPS, literal
from .runtime import cdiv, interpreter, next_pow2

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ref_expr(ref, names: dict) -> str:
    if isinstance(ref, str):
        return names[ref]
    return literal(ref)


def kernel_source(spec: dict, n_inputs: int, ndim: int) -> str:
    """Triton source of the region kernel for `n_inputs` inputs and an iteration space of `ndim` dims."""
    lead = ndim - 1
    params = [f"in{i}" for i in range(n_inputs)] + ["out_ptr", "R", "C"]
    params += [f"size{d}" for d in range(lead)]
    for i in range(n_inputs):
        params += [f"s{i}_{d}" for d in range(ndim)]
    params += ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"]
    L = []
    L.append("import triton")
    L.append("import triton.language as tl")
    L.append("")
    L.append("from codegen import tl_math  # noqa: F401")
    L.append("")
    L.append(f"# spec: {json.dumps(spec, sort_keys=True)}")
    L.append("")
    L.append("")
    L.append("@triton.jit")
    L.append(f"def region_kernel({', '.join(params)}):")
    L.append("    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)")
    L.append("    row_ok = rows < R")
    # unravel the row index into the leading dims (last leading dim fastest)
    L.append("    rest = rows")
    for d in reversed(range(lead)):
        L.append(f"    idx{d} = rest % size{d}")
        L.append(f"    rest = rest // size{d}")
    for i in range(n_inputs):
        terms = " + ".join(f"idx{d} * s{i}_{d}" for d in range(lead)) or "rows * 0"
        L.append(f"    base{i} = {terms}")
    kind = spec.get("reduce")
    if kind == "max":
        L.append("    acc = tl.full((BLOCK_R,), float(\"-inf\"), tl.float32)")
    elif kind in ("sum", "mean"):
        L.append("    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)")
    L.append("    for c0 in range(0, C, BLOCK_C):")
    L.append("        cols = c0 + tl.arange(0, BLOCK_C)")
    L.append("        mask = row_ok[:, None] & (cols < C)[None, :]")
    names = {}
    for i in range(n_inputs):
        L.append(f"        a{i} = tl.load(in{i} + base{i}[:, None] + cols[None, :] * s{i}_{ndim - 1}, mask=mask, "
                 f"other=0).to(tl.float32)")
        names[f"i{i}"] = f"a{i}"
    for j, op in enumerate(spec["ops"]):
        rule = BY_NAME[op["rule"]]
        args = [_ref_expr(r, names) for r in op["args"]]
        L.append(f"        v{j} = {rule.expr(args, op.get('kw', {}))}  # {rule.name}")
        names[f"v{j}"] = f"v{j}"
    last = f"v{len(spec['ops']) - 1}"
    if kind is None:
        L.append(f"        tl.store(out_ptr + rows[:, None] * C + cols[None, :], "
                 f"{last}.to(out_ptr.dtype.element_ty), mask=mask)")
    elif kind == "max":
        L.append(f"        acc = tl.maximum(acc, tl.max(tl.where(mask, {last}, float(\"-inf\")), axis=1))")
    else:
        L.append(f"        acc = acc + tl.sum(tl.where(mask, {last}, 0.0), axis=1)")
    if kind is not None:
        if kind == "mean":
            L.append("    acc = acc / C")
        L.append("    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)")
    return "\n".join(L) + "\n"


def iteration_shape(inputs) -> torch.Size:
    return torch.Size(_broadcast(tuple(tuple(t.shape) for t in inputs)))


@functools.lru_cache(maxsize=4096)
def _broadcast(shapes: tuple) -> tuple:
    """The broadcast of shapes (numpy rules; plain Python: torch.broadcast_shapes costs ~150 µs a call, more
    than a small region's kernel takes on a GPU)."""
    out: list = []
    for shape in shapes:
        for i, n in enumerate(reversed(shape)):
            if i == len(out):
                out.append(n)
            elif out[i] == 1:
                out[i] = n
            elif n != 1 and n != out[i]:
                raise RuntimeError(f"shapes {shapes} do not broadcast")
    return tuple(reversed(out))


def output_shape(spec: dict, shape) -> list:
    shape = list(shape)
    if spec.get("reduce") is None:
        return shape
    return shape[:-1] + [1] if spec.get("keepdim") else shape[:-1]


def blocks(R: int, C: int, tile: int | None = None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): a tile of `tile` elements (default 4096 on a GPU, shrunk for small tensors so the grid
    still has ~1024 programs: launch sizes that fill the GPU), BLOCK_C ≤ 1024 columns."""
    if interpreter():
        tile = tile or 4096
        cap = 128
    else:
        total = R * C
        tile = tile or max(1024, min(4096, next_pow2(max(total // 1024, 1))))
        cap = 1024
    bc = min(next_pow2(max(C, 1)), cap)
    br = min(next_pow2(max(R, 1)), max(1, tile // bc))
    return br, bc


@functools.lru_cache(maxsize=1024)
def compiled(spec_text: str, n_inputs: int, ndim: int, dump_dir=None):
    """The region kernel for a spec (memoised per process: a launch pays no source generation)."""
    source = kernel_source(json.loads(spec_text), n_inputs, ndim)
    if dump_dir is not None:
        cache.dump(dump_dir, f"region_{cache.kernel_key(source)}", source)
    return cache.load_source(source).region_kernel


@functools.lru_cache(maxsize=1024)
def parse_spec(spec_text: str) -> dict:
    return json.loads(spec_text)


@functools.lru_cache(maxsize=4096)
def _plan(spec_text: str, shapes: tuple, strides: tuple, device, tile):
    """Everything about a launch that depends only on the spec and the inputs' shapes and strides (memoised: a
    repeated call only allocates its output and launches — the host cost of a region is what a small tensor's
    time is made of)."""
    spec = parse_spec(spec_text)
    shape = list(_broadcast(shapes))
    ndim = max(len(shape), 1)
    shape = shape or [1]
    C = shape[-1]
    R = 1
    for n in shape[:-1]:
        R *= n
    bstrides = []
    for sh, st in zip(shapes, strides):
        pad = ndim - len(sh)
        bstrides += [0] * pad + [0 if n == 1 else s_ for n, s_ in zip(sh, st)]
    br, bc = blocks(R, C, tile)
    return (R, C, tuple(shape[:-1]), tuple(bstrides), br, bc, cdiv(R, br) if R else 0,
            tuple(output_shape(spec, shape)), ndim)


def launch(inputs: list, spec: dict, dump_dir=None, out: torch.Tensor | None = None, spec_text: str | None = None,
           tile: int | None = None) -> torch.Tensor:
    """Run the region kernel; `out` (contiguous, the output shape) receives the result (tests pass guarded views);
    `tile` overrides the elements per program."""
    spec_text = spec_text or json.dumps(spec, sort_keys=True)
    R, C, lead, bstrides, br, bc, programs, oshape, ndim = _plan(
        spec_text, tuple(tuple(t.shape) for t in inputs), tuple(tuple(t.stride()) for t in inputs),
        inputs[0].device, tile)
    if out is None:
        out = torch.empty(oshape, dtype=DTYPES[spec["dtype"]], device=inputs[0].device)
    assert out.is_contiguous(), "region kernels write a contiguous output"
    if R == 0 or C == 0:                 # empty: no launch (a sum over an empty dim is still 0)
        if out.numel():
            out.copy_(reference(inputs, spec))
        return out
    kernel = compiled(json.dumps(spec, sort_keys=True) if dump_dir is not None else _canonical(spec_text),
                      len(inputs), ndim, dump_dir)
    opts = {} if interpreter() or br * bc < 8192 else {"num_warps": 8}
    kernel[(programs,)](*inputs, out, R, C, *lead, *bstrides, BLOCK_R=br, BLOCK_C=bc, **opts)
    return out


@functools.lru_cache(maxsize=1024)
def _canonical(spec_text: str) -> str:
    return json.dumps(json.loads(spec_text), sort_keys=True)


def region_bucket(inputs: list) -> tuple:
    """codegen.select's shape bucket of a region call: per input its rows rounded up to a power of two, its last
    dim, contiguity and dtype."""
    from .select import bucket
    return tuple((bucket([t], (0,))[0], str(t.dtype)) for t in inputs)


def candidates(inputs: list, spec: dict, spec_text: str):
    """codegen.select candidates: the generated kernel with its default tile, with 4× that tile (GPU only), and the
    region's aten ops."""
    from .select import Candidate
    out = [Candidate("triton[region]", "triton", lambda: launch(inputs, spec, spec_text=spec_text))]
    if not interpreter():
        out.append(Candidate("triton[region tile16k]", "triton",
                             lambda: launch(inputs, spec, spec_text=spec_text, tile=16384)))
    out.append(Candidate("aten", "aten", lambda: reference(inputs, spec)))
    return out


def reference(inputs: list, spec: dict) -> torch.Tensor:
    """Run the region with the original aten ops (what the fused kernel must match)."""
    values = {f"i{i}": t for i, t in enumerate(inputs)}
    v = None
    for j, op in enumerate(spec["ops"]):
        rule = BY_NAME[op["rule"]]
        args = [values[r] if isinstance(r, str) else r for r in op["args"]]
        v = rule.op(*args, **op.get("kw", {}))
        values[f"v{j}"] = v
    kind = spec.get("reduce")
    if kind is not None:
        v = REDUCTION_OPS[kind](v, [-1], bool(spec.get("keepdim")))
    return v.to(DTYPES[spec["dtype"]])
