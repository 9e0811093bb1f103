"""Compile every kernel a GPU run would launch, for a GPU that is not here.

    python -m codegen.compile_check [--arch 90] [--arch 80] [--quick] [--json]      (TRITON_INTERPRET unset)

The interpreter tests check what the kernels compute, but the interpreter accepts programs the GPU compiler
rejects (a tl.dot with a block under 16, a type mismatch the numpy backend casts away) and says nothing of the
resources a kernel needs. This check closes that gap without a GPU:

1. record: the real launch code runs on CPU tensors of GPU-sized shapes — each template's `launch()` at LLM shapes
   in fp16 / bf16 / fp32, and whole lowered demo programs (which add the generated region kernels) — with the
   kernel launch replaced by a recorder. Block sizes are the GPU's (the interpreter is off); every codegen.select
   call runs all its Triton candidates (tile configurations, variants), so each one a GPU might pick is
   recorded. Each record is (kernel, arguments, constexprs, launch options, grid).
2. compile: each distinct record goes through Triton's own launch-time path (`JITFunction.warmup`: the same
   argument binding, specialisation and options as a launch), with a stand-in driver that names the target GPU,
   down to a cubin (LLVM, then ptxas).
3. check: the cubin's registers and local memory (spills, from cuobjdump), its shared memory against the
   target's per-block limit, threads per block ≤ 1024, and the grid against CUDA's limits (x < 2³¹, y, z ≤ 65535).

Exit status 0 when everything compiles within the limits (spills are reported, not failed), 1 otherwise,
2 when it cannot run here (the interpreter is on, or Triton has no NVIDIA backend).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

# Max dynamic shared memory per block (opt-in), bytes: A100 (sm_80), RTX 30/40 (sm_86/89), H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
GRID_LIMIT = (2**31 - 1, 65535, 65535)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Launch:
    """One recorded kernel launch: what `kernel[grid](*args, **kwargs)` was called with."""
    kernel: object            # triton JITFunction
    args: tuple
    kwargs: dict              # constexprs and launch options (num_warps, num_stages)
    grid: tuple
    case: str                 # which case launched it
    tuned_group: tuple | None = None   # (selection call, launch position): a candidate's launch (None: plain)
    archs: tuple | None = None         # the only archs it is compiled for (None: all): TMA kernels need sm_90

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        """Distinct specialisations: the kernel, the arguments' dtypes and constexpr-ish values, the options."""
        def norm(a):
            if isinstance(a, torch.Tensor):
                return (str(a.dtype), a.data_ptr() % 16 == 0)
            if isinstance(a, int) and not isinstance(a, bool):
                return ("int", a == 1, a % 16 == 0, abs(a) >= 2**31)
            return a
        # id(kernel): generated region kernels all share one name, each is its own source
        return (self.name, id(self.kernel), tuple(norm(a) for a in self.args), tuple(sorted(self.kwargs.items())))

    def describe(self) -> str:
        dtypes = sorted({str(a.dtype).replace("torch.", "") for a in self.args if isinstance(a, torch.Tensor)})
        consts = ",".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in ("num_warps", "num_stages"))
        return f"{'/'.join(dtypes)} {consts}"


@dataclass
class Result:
    launch: Launch
    arch: int
    ok: bool
    error: str = ""
    seconds: float = 0.0
    regs: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    problems: list = field(default_factory=list)
    pruned: bool = False      # a candidate over a limit: selection skips it, another candidate runs

    def row(self) -> dict:
        return dict(kernel=self.launch.name, arch=f"sm_{self.arch}", spec=self.launch.describe(),
                    case=self.launch.case, num_warps=self.num_warps, num_stages=self.num_stages, regs=self.regs,
                    spill_bytes=self.local_bytes, shared_bytes=self.shared_bytes, grid=list(self.launch.grid),
                    ok=self.ok, pruned=self.pruned, problems=self.problems + ([self.error] if self.error else []),
                    compile_s=round(self.seconds, 2))


# ----------------------------------------------------------------------------------------------------- recording

_CALLS = [0]
_GROUP: list = [None]         # [call id, launches so far] while the candidates of one selection call run


def run_all_triton(candidates, limit: int | None = None) -> torch.Tensor | None:
    """Run every Triton candidate of one codegen.select call (inside `recording`: each launch is recorded, tagged
    with (call, position within its candidate) so a configuration over a limit counts as skipped when another
    candidate's launch in the same position fits — as selection skips a failing candidate)."""
    _CALLS[0] += 1
    result = None
    for cand in [c for c in candidates if c.kind == "triton"][:limit]:
        _GROUP[0] = [_CALLS[0], 0]
        try:
            result = cand.run()
        finally:
            _GROUP[0] = None
    return result


@contextlib.contextmanager
def recording(into: list, case: list, all_configs: bool = True):
    """Within: every Triton launch is recorded into `into` instead of run; every codegen.select call runs all its
    Triton candidates (only the first without `all_configs`); the cuBLAS GEMM of the hybrid candidates returns an
    uninitialised tensor (nothing is computed here); and the rewrite_triton ops take their kernel path on CPU
    tensors."""
    from triton.runtime.jit import JITFunction

    import codegen.ops as kops
    from codegen import select
    from codegen.templates import gemm

    def bound(fn, args, kwargs):
        named = dict(zip(fn.arg_names, args))
        named.update(kwargs)
        return named

    def resolve(grid, named):
        grid = grid(named) if callable(grid) else grid
        return tuple(int(g) for g in grid)

    def record_jit(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original_jit(self, *args, grid=grid, warmup=warmup, **kwargs)
        group = None
        if _GROUP[0] is not None:
            group = (_GROUP[0][0], _GROUP[0][1])
            _GROUP[0][1] += 1
        archs = (90,) if self is gemm.tma_gemm_kernel else None
        into.append(Launch(self, args, dict(kwargs), resolve(grid, bound(self, args, kwargs)), case[0], group,
                           archs))

    def record_dispatch(op, candidates, device, dtype, shape_bucket, fast_key=None):
        triton_side = [c for c in candidates if c.kind == "triton"]
        return run_all_triton(triton_side if all_configs else triton_side[:1])

    def no_gemm(x, w):
        return torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)

    saved = (JITFunction.run, select.dispatch, kops.can_launch, gemm.dense_linear)
    original_jit = saved[0]
    JITFunction.run, select.dispatch, kops.can_launch, gemm.dense_linear = \
        record_jit, record_dispatch, (lambda *tensors: True), no_gemm
    gemm.RECORD_TMA[0] = True          # the Hopper candidates too (compiled for sm_90 only)
    kops._CHECKED.clear()              # the ops memoise can_launch per signature: none from before or during this
    try:
        yield
    finally:
        JITFunction.run, select.dispatch, kops.can_launch, gemm.dense_linear = saved
        gemm.RECORD_TMA[0] = False
        kops._CHECKED.clear()


def template_cases(quick: bool):
    """(name, thunk) pairs: every Triton candidate of each template at LLM-sized shapes. Tensors are torch.empty:
    nothing runs, only shapes, strides, dtypes and alignment matter."""
    from codegen.templates import blockdiag_linear as bd_t
    from codegen.templates import lora_batch as lb_t
    from codegen.templates import lora_linear as lora_t
    from codegen.templates import monarch_linear as mon_t
    from codegen.templates import shiftadd_linear as sa_t
    from codegen.templates import softmax as sm_t
    from codegen.templates import softplus_attention as sp_t
    from codegen.templates import vq_logits as vq_t
    E = torch.empty
    dtypes = (torch.float16,) if quick else DTYPES
    cases = []

    def add(name, module_candidates, *args, **kwargs):
        # --quick: every candidate of the LoRA call (the GEMM template's tile and TMA configurations, the cuBLAS
        # epilogue variant), the first two elsewhere
        limit = 2 if quick and not name.startswith("lora") else None
        cases.append((name, lambda: run_all_triton(module_candidates(*args, **kwargs), limit)))

    for dt in dtypes:
        tag = str(dt).replace("torch.", "")
        d, r = 4096, 16
        for m in (1, 512) if not quick else (512,):
            add(f"lora {tag} {m}x{d} r{r} +bias+gelu+residual", lora_t.candidates, E(m, d, dtype=dt),
                E(d, d, dtype=dt), E(d, dtype=dt), E(r, d, dtype=dt), E(d, r, dtype=dt), 2.0, None, "gelu",
                E(m, d, dtype=dt))
        if not quick:
            add(f"lora {tag} dropout input, no bias", lora_t.candidates, E(64, 1024, dtype=dt),
                E(768, 1024, dtype=dt), None, E(8, 1024, dtype=dt), E(768, 8, dtype=dt), 0.5, E(64, 1024, dtype=dt))
        for m, n_ad in ((8, 8), (512, 8)) if not quick else ((512, 8),):   # mixed-adapter batches, 8 adapters
            cases.append((f"lora_batch {tag} {m}x{d} {n_ad} adapters r{r}",
                          lambda dt=dt, m=m, n_ad=n_ad: lb_t.launch(
                              E(m, d, dtype=dt), E(d, d, dtype=dt), E(d, dtype=dt), None,
                              [E(r, d, dtype=dt)] * n_ad, [E(d, r, dtype=dt)] * n_ad, [1.0] * n_ad,
                              torch.arange(m) % n_ad)))
        if not quick:
            cases.append((f"lora_batch {tag} on a base output, dropout input",
                          lambda dt=dt: lb_t.launch(E(64, 1024, dtype=dt), None, None, E(64, 768, dtype=dt),
                                                    [E(8, 1024, dtype=dt)] * 2, [E(768, 8, dtype=dt)] * 2,
                                                    [1.0, 0.5], torch.arange(64) % 3 - 1,
                                                    adapter_input=E(64, 1024, dtype=dt))))
        for rows, n in ((4096, 1024), (8192, 512), (64, 32768), (4, 131072)):
            add(f"softmax {tag} {rows}x{n}", sm_t.candidates, E(rows, n, dtype=dt), -1)
        for d, nb in ((4096, 64), (1024, 4)):
            p = d // nb
            add(f"monarch {tag} 512x{d} b{nb}", mon_t.candidates, E(512, d, dtype=dt), E(nb, p, p, dtype=dt),
                E(nb, p, p, dtype=dt), E(d, dtype=dt), d)
        # a structured FFN: up-projection + GELU folded in, down-projection + the residual add folded in
        add(f"monarch {tag} 512x4096 b64 +bias+gelu+residual", mon_t.candidates, E(512, 4096, dtype=dt),
            E(64, 64, 64, dtype=dt), E(64, 64, 64, dtype=dt), E(4096, dtype=dt), 4096, "gelu",
            E(512, 4096, dtype=dt))
        add(f"monarch {tag} 4096x2048→8192 b4 +bias+gelu", mon_t.candidates, E(4096, 2048, dtype=dt),
            E(4, 2048, 512, dtype=dt), E(4, 2048, 2048, dtype=dt), E(8192, dtype=dt), 8192, "gelu")
        add(f"blockdiag {tag} 512x4096 b4", bd_t.candidates, E(512, 4096, dtype=dt), E(4, 1024, 1024, dtype=dt),
            None, E(4096, dtype=dt), 4096)
        add(f"blockdiag {tag} 512x4096 b4 +bias+gelu+residual", bd_t.candidates, E(512, 4096, dtype=dt),
            E(4, 1024, 1024, dtype=dt), None, E(4096, dtype=dt), 4096, "gelu", E(512, 4096, dtype=dt))
        add(f"blockdense {tag} 512x4096 b4 → 11008 +gelu+residual", bd_t.candidates, E(512, 4096, dtype=dt),
            E(4, 256, 1024, dtype=dt), E(11008, 1024, dtype=dt), None, 11008, "gelu", E(512, 11008, dtype=dt))
        add(f"lowrank {tag} 512x4096 r256 +bias+gelu+residual", bd_t.candidates_lowrank, E(512, 4096, dtype=dt),
            E(4096, 256, dtype=dt), E(256, 4096, dtype=dt), E(4096, dtype=dt), "gelu", E(512, 4096, dtype=dt))
        for m in (1, 16):
            add(f"shiftadd {tag} {m}x4096→4096 q3 g128", sa_t.candidates, E(m, 4096, dtype=dt),
                E(3, 4096, 512, dtype=torch.uint8), E(4096, 32, 3, 1, dtype=torch.int8), None, 4096, 128)
            # the affine code: shared exponents (1, 1, q, 1) read through stride-0 views, fp16 scales and offsets
            add(f"shiftadd affine {tag} {m}x4096→4096 q4 g64 +bias", sa_t.candidates, E(m, 4096, dtype=dt),
                E(4, 4096, 512, dtype=torch.uint8), E(1, 1, 4, 1, dtype=torch.int8), E(4096, dtype=dt), 4096, 64,
                E(4096, 64, dtype=torch.float16), E(4096, 64, dtype=torch.float16))
        for rows in (1, 512):
            for log_softmax, bias in ((False, False), (True, False), (True, True)):
                add(f"vq {tag} {rows}x768 V50257 K1024 log_softmax={log_softmax} bias={bias}", vq_t.candidates,
                    E(rows, 768, dtype=dt), E(1024, 768, dtype=dt), torch.zeros(50257, dtype=torch.int64),
                    E(50257, dtype=dt) if bias else None, log_softmax)
        for causal, mask, reweight, head in ((True, False, False, False), (False, False, False, False),
                                             (False, True, False, False), (True, False, True, False),
                                             (True, False, False, True)):
            for d in (64,) if quick else (64, 128, 256):   # head: the calibrated per-head gain and bias (fp32)
                add(f"softplus-attn {tag} 2x8x1024x{d} causal={causal} mask={mask} reweight={reweight} "
                    f"gain,bias={head}",
                    sp_t.candidates, E(2, 8, 1024, d, dtype=dt), E(2, 8, 1024, d, dtype=dt),
                    E(2, 8, 1024, d, dtype=dt), torch.ones(1024, 1024, dtype=torch.bool) if mask else None,
                    causal, reweight, 1.0, 512, 1e-6, E(8) if head else None, E(8) if head else None)
    return cases


def program_cases(quick: bool):
    """(name, thunk) pairs: lowered demo programs run end to end (LoRA with fused epilogues, generated regions,
    two-pass softmax, softplus attention, VQ head, Monarch)."""
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    specs = ["lora{rank=8,init=gaussian}", "two-pass-softmax"] if quick else \
        ["lora{rank=8,init=gaussian}", "two-pass-softmax", "softplus-attn", "vq-logits{codes=64}",
         "monarch{blocks=4}", "lowrank{rank=16}"]
    cases = []
    for spec in specs:
        def run(spec=spec):
            model, args = demo_model("tiny-gpt")
            with contextlib.redirect_stderr(open(os.devnull, "w")):
                program = rewrite(model, args, passes=spec, codegen="triton").module()
            program(*args)
        cases.append((f"demo:tiny-gpt {spec} --codegen triton", run))
    return cases


class _PointwiseRegion(torch.nn.Module):
    def forward(self, x, b, res):
        return torch.sigmoid(x + b) * res - torch.tanh(res)


class _ReductionRegion(torch.nn.Module):
    def forward(self, x, b, res):
        y = torch.nn.functional.gelu(x * 0.5 + b) + res
        return (y * y).sum(-1), y


def region_cases(quick: bool):
    """(name, thunk) pairs: generated region kernels (pointwise, and pointwise + last-dim reduction) of small
    exported functions at GPU shapes."""
    import codegen
    from rewriter.pass_manager import Report
    cases = []
    for dt in (torch.float16,) if quick else DTYPES:
        for module in (_PointwiseRegion(), _ReductionRegion()):
            def run(dt=dt, module=module):
                args = (torch.zeros(4096, 1024, dtype=dt), torch.zeros(1024, dtype=dt),
                        torch.zeros(4096, 1024, dtype=dt))
                gm = torch.export.export(module, args).module()
                codegen.lower(gm, list(args), Report())
                gm(*args)
            cases.append((f"region {type(module).__name__[1:]} {str(dt).replace('torch.', '')} 4096x1024", run))
    return cases


def record_all(quick: bool) -> list[Launch]:
    launches: list[Launch] = []
    case = [""]
    for kind, cases in (("program", program_cases(quick)), ("template", template_cases(quick) + region_cases(quick))):
        for name, thunk in cases:
            case[0] = name
            # --quick: every candidate is compiled at the templates' LLM shapes, not again per program
            with recording(launches, case, all_configs=not (quick and kind == "program")):
                thunk()
    unique: dict = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# ----------------------------------------------------------------------------------------------------- compiling

class _TargetDriver:
    """Stands in for the CUDA driver at compile time: names the target GPU; compiles, never launches."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local-memory bytes) of the cubin's kernel, from the cuobjdump that ships with Triton."""
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (int(regs.group(1)) if regs else None), (int(local.group(1)) if local else None)


def compile_one(launch: Launch, arch: int) -> Result:
    from triton.runtime.driver import driver
    result = Result(launch, arch, ok=False)
    launch.kernel.device_caches.clear()         # the binder caches its target: start fresh for this arch
    driver.set_active(_TargetDriver(arch))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    except Exception as e:  # a compile error is the finding, whatever its type
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return result
    finally:
        result.seconds = time.perf_counter() - start
        driver.set_active(None)                 # back to the machine's own driver, if it has one
        launch.kernel.device_caches.clear()
    meta = compiled.metadata
    result.num_warps, result.num_stages = meta.num_warps, meta.num_stages
    result.shared_bytes = meta.shared
    result.regs, result.local_bytes = _resource_usage(compiled.asm["cubin"])
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and meta.shared > limit:
        result.problems.append(f"shared memory {meta.shared} B > {limit} B per block on sm_{arch}")
    if meta.num_warps * 32 > 1024:
        result.problems.append(f"{meta.num_warps * 32} threads per block > 1024")
    for axis, (g, lim) in enumerate(zip(launch.grid + (1, 1), GRID_LIMIT)):
        if g > lim:
            result.problems.append(f"grid[{axis}] = {g} > {lim}")
    result.ok = not result.problems
    return result


def check(archs, quick: bool) -> list[Result]:
    launches = record_all(quick)
    results = [compile_one(launch, arch) for arch in archs for launch in launches
               if launch.archs is None or arch in launch.archs]
    return prune_candidates(results)


def prune_candidates(results: list[Result]) -> list[Result]:
    """A candidate's launch over a resource limit is not a failure when another candidate's launch in the same
    position of the same selection call fits: codegen.select skips a candidate that raises OutOfResources.
    Compile errors still fail."""
    groups: dict = {}
    for r in results:
        if r.launch.tuned_group is not None:
            groups.setdefault((r.arch, r.launch.tuned_group), []).append(r)
    for members in groups.values():
        if any(r.ok for r in members):
            for r in members:
                if not r.ok and not r.error:
                    r.ok, r.pruned = True, True
    return results


# ----------------------------------------------------------------------------------------------------- CLI

def _cannot_run() -> str | None:
    from codegen.runtime import interpreter
    if interpreter():
        return "TRITON_INTERPRET is set: this check needs Triton's compiler; run it with TRITON_INTERPRET unset"
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:
        return "this Triton has no NVIDIA backend to compile for"
    return None


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="kernels compiled for the target GPU (no GPU needed)", show_lines=False)
    for col in ("kernel", "arch", "specialisation", "warps", "stages", "regs", "spill B", "smem KiB", "grid",
                "status"):
        table.add_column(col, overflow="fold")
    for r in results:
        status = "; ".join(r.problems + ([r.error] if r.error else [])) or "ok"
        status = f"selection skips it: {status}" if r.pruned else status
        table.add_row(r.launch.name, f"sm_{r.arch}", r.launch.describe(), str(r.num_warps), str(r.num_stages),
                      str(r.regs), str(r.local_bytes), f"{r.shared_bytes / 1024:.1f}" if r.shared_bytes is not None
                      else "-", "×".join(map(str, r.launch.grid)), status)
    Console(width=200).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability ×10: 90 (H100/H200), 80 (A100), 86/89 (RTX 30/40); default 90")
    parser.add_argument("--quick", action="store_true", help="fp16 only, fewer shapes, every candidate only for LoRA "
                        "(two elsewhere)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    reason = _cannot_run()
    if reason:
        print(f"compile_check: {reason}", file=sys.stderr)
        return 2
    import triton
    archs = args.arch or [90]
    results = check(archs, args.quick)
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps(dict(triton=triton.__version__, torch=torch.__version__, archs=archs,
                              kernels=[r.row() for r in results], failed=len(failed)), indent=1))
    else:
        print_table(results)
        spills = [r for r in results if r.local_bytes]
        pruned = [r for r in results if r.pruned]
        print(f"{len(results)} specialisations compiled for {', '.join(f'sm_{a}' for a in archs)} with triton "
              f"{triton.__version__}: {len(failed)} failed, {len(pruned)} candidate launches over a limit (skipped by "
              f"codegen.select), {len(spills)} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
