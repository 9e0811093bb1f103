"""Run one pipeline on one random model and say how it ended — the fuzzer's verdict, shared by tests/test_fuzz.py and
`python -m bench.fuzz`.

Every run must end in one of three ways, through the Python API and the CLI alike:
    rewritten   the pipeline ran (and verified, with verify=True / --verify)            CLI exit 0
    refused     verification refused the result and said why                           CLI exit 1
    declined    the pipeline does not apply to this model, with a one-line reason       CLI exit 2
Anything else — an internal error (exit 3), a traceback, a message of several lines, a rewritten program that does
not run, changes its outputs' shapes or dtypes, or holds a tensor off the model's device — is a bug.

Device check without a GPU: while a pass runs, torch's default device is "meta" (`tag_pass_devices`), so a tensor a
pass creates without `device=` lands on meta and either breaks the pass or shows up in the result; on a GPU the
same mistake is a CPU tensor beside CUDA weights ("Expected all tensors to be on the same device").
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass

import torch

import rewriter
from rewriter.errors import InternalError, UserError, VerificationError
from rewriter.pass_base import registry

from .random_models import ModelSpec, build, fuzz_device

OUTCOMES = ("rewritten", "refused", "declined", "internal")


@dataclass
class Verdict:
    outcome: str          # one of OUTCOMES
    detail: str = ""      # the reason (refused/declined) or what went wrong (internal)

    @property
    def ok(self) -> bool:
        return self.outcome != "internal"


def pass_specs() -> list[str]:
    """Every registered pass, with its fuzz_options (cheap settings for tiny models)."""
    specs = []
    for name, cls in sorted(registry().items()):
        specs.append(cls(**cls.fuzz_options).spec())
    return specs


# pipelines of several passes users run (and that found bugs before)
PIPELINES = ["lora{rank=4},lora-merge", "lora{init=pissa},lora-merge,lora-unmerge", "lora{rank=2,init=gaussian},lora-merge",
             "monarch,two-pass-softmax", "lowrank{rank=2},lora{rank=2}", "shiftadd{bits=2},two-pass-softmax",
             "softplus-attn,two-pass-softmax", "structured{budget=0.5},lora-merge",
             "shiftadd{bits=2,calibrate=2},heal{steps=2,samples=4,seq=8,batch=2}",
             "monarch{calibrate=2},vq-logits{codes=8,iters=2,calibrate=2},heal{steps=2,samples=4,seq=8,batch=2}",
             "lora{name=a,init=gaussian},lora{name=b,init=gaussian},lora-combine{adapters=a+b,name=c},lora-batch"]


@contextlib.contextmanager
def tag_pass_devices():
    """Run every registered pass with torch's default device set to "meta" (see the module docstring)."""
    patched = []
    for cls in registry().values():
        original = cls.__dict__.get("run")
        if original is None:
            continue

        def run(self, ctx, _original=original):
            with torch.device("meta"):
                return _original(self, ctx)
        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


def _tensors(program: torch.export.ExportedProgram):
    yield from program.state_dict.items()
    yield from program.constants.items()


def check_result(dtype: torch.dtype, model, args, program: torch.export.ExportedProgram) -> str | None:
    """What is wrong with a rewritten program (None when nothing is): it must run, keep the outputs' shapes and
    dtypes, keep every tensor on the model's device, and keep floating weights in the model's dtype."""
    with torch.no_grad():
        want = model(*args)
        try:
            got = program.module()(*args)
        except Exception as e:  # noqa: BLE001 - any failure to run is the finding
            return f"rewritten program does not run: {type(e).__name__}: {e}"
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    if [(tuple(t.shape), t.dtype) for t in want] != [(tuple(t.shape), t.dtype) for t in got]:
        return f"outputs changed from {[(tuple(t.shape), t.dtype) for t in want]} to " \
               f"{[(tuple(t.shape), t.dtype) for t in got]}"
    device = fuzz_device()
    for name, t in _tensors(program):
        if t.device.type != device.type:
            return f"{name} is on {t.device} (the model is on {device}): created without device="
        if t.is_floating_point() and t.dtype != dtype and t.numel() > 2 and not _narrower(t.dtype, dtype):
            return f"{name} is {t.dtype} in a {dtype} model"
    return None


def _narrower(kind: torch.dtype, model: torch.dtype) -> bool:
    """fp16 in an fp32 model: a packed format's quantisation parameters (shiftadd's affine scales and offsets are
    stored in fp16 whatever the model, bf16 in a bf16 model) — smaller, never a silent upcast."""
    return model == torch.float32 and kind == torch.float16


def _one_line(text: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in text


def run_api(spec: ModelSpec, pipeline: str, *, verify: bool = True, codegen: str | None = None) -> Verdict:
    model, args = build(spec)
    try:
        with tag_pass_devices():
            result = rewriter.rewrite(model, args, pipeline, verify=verify, codegen=codegen)
    except VerificationError as e:
        return Verdict("refused", str(e)) if str(e).strip() else Verdict("internal", "refused without a reason")
    except InternalError as e:
        return Verdict("internal", str(e))
    except UserError as e:
        return Verdict("declined", str(e)) if _one_line(str(e)) else Verdict("internal", f"bad message: {e!r}")
    except Exception as e:  # noqa: BLE001 - an escaped exception is an internal error
        return Verdict("internal", f"{type(e).__name__}: {e}")
    problem = check_result(spec.torch_dtype, model, args, result.program)
    return Verdict("internal", problem) if problem else Verdict("rewritten")


def run_codegen(spec: ModelSpec, pipeline: str) -> Verdict:
    """run_api with the rewritten ops lowered to Triton kernels (the interpreter on the CPU)."""
    return run_api(spec, pipeline, codegen="triton")


def run_cli(spec: ModelSpec, pipeline: str, folder: str | None = None) -> Verdict:
    """The same through `rewrite MODEL.pt2 --pass PIPELINE --verify -o OUT.pt2` (in this process)."""
    from rewriter.cli import main
    model, args = build(spec)
    with contextlib.ExitStack() as stack:
        parent = folder or stack.enter_context(tempfile.TemporaryDirectory())
        folder = tempfile.mkdtemp(dir=parent)     # a fresh folder per run: no output left by an earlier one
        source, target = os.path.join(folder, "model.pt2"), os.path.join(folder, "out.pt2")
        torch.export.save(torch.export.export(model, args), source)
        before = open(source, "rb").read()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), tag_pass_devices():
            code = main([source, "--pass", pipeline, "--verify", "-o", target, "-q"])
        message = err.getvalue()
        if open(source, "rb").read() != before:
            return Verdict("internal", "the input file was modified")
        if code in (1, 2):
            if code == 2 and os.path.exists(target):
                return Verdict("internal", f"exit 2 but {target} was written")
            if not _one_line(message):
                return Verdict("internal", f"exit {code} without a one-line reason: {message!r}")
            return Verdict("refused" if code == 1 else "declined", message.strip())
        if code != 0:
            return Verdict("internal", f"exit {code}: {message.strip()}")
        if not os.path.exists(target):
            return Verdict("internal", "exit 0 but no output written")
        problem = check_result(spec.torch_dtype, model, args, torch.export.load(target))
        return Verdict("internal", problem) if problem else Verdict("rewritten")


def run_compile(spec: ModelSpec, pipeline: str) -> Verdict:
    """torch.compile(model, backend=rewriter.backend(pipeline)) must compute what
    rewriter.rewrite(model, args, pipeline).module() computes — the same rewrite, the same numbers — or both must
    decline."""
    import torch._dynamo
    from torch._dynamo.exc import BackendCompilerFailed

    from rewriter.verify import relative_error
    model, args = build(spec)
    try:
        direct = rewriter.rewrite(model, args, pipeline)
    except UserError as e:
        direct, declined = None, str(e)
    except Exception as e:  # noqa: BLE001
        return Verdict("internal", f"rewrite: {type(e).__name__}: {e}")
    torch._dynamo.reset()   # one code object (RandomNet.forward) for every model: no stale cache, no recompile limit
    backend = rewriter.backend(pipeline, inner="eager")
    try:
        with torch.no_grad():
            got = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)(*args)
    except BackendCompilerFailed as e:
        inner = e.inner_exception
        if isinstance(inner, UserError) and direct is None:
            return Verdict("declined", declined)
        return Verdict("internal", f"compile: {type(inner).__name__}: {inner}" +
                       ("" if direct is None else " (rewrite succeeded)"))
    finally:
        torch._dynamo.reset()
    if direct is None:
        return Verdict("internal", f"rewrite declined ({declined}) but compile rewrote")
    if _rewritten_sites(backend.report) != _rewritten_sites(direct.report):
        return Verdict("internal", f"compile rewrote {_rewritten_sites(backend.report)} sites per pass, rewrite "
                                   f"{_rewritten_sites(direct.report)}")
    with torch.no_grad():
        want = direct.module()(*args)
    want = list(want) if isinstance(want, tuple) else [want]
    got = list(got) if isinstance(got, tuple) else [got]
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[spec.torch_dtype]
    err = relative_error(want, got)
    if not err <= tolerance:
        return Verdict("internal", f"compiled and rewritten programs differ: relative error {err:.3g}")
    return Verdict("rewritten")


def _rewritten_sites(report) -> list[int]:
    return [sum(1 for site in r.sites if site["status"] == "rewritten") for r in report.passes]
