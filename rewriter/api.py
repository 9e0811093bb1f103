"""The Python entry point: `rewrite(model, example_args, passes="lora,lora-merge")`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .capture import Captured, capture, export_program
from .errors import UserError
from .pass_base import Pass, parse_pipeline
from .pass_manager import Instrument, Report, run_passes
from .verify import flat_inputs


@dataclass
class RewriteResult:
    program: torch.export.ExportedProgram      # the rewritten program
    original: torch.export.ExportedProgram     # the program as captured
    report: Report
    passes: list[Pass]
    args: tuple
    kwargs: dict
    store: object | None = None                # rewriter.lazy_weights.WeightStore (mapped checkpoint weights)

    def module(self) -> torch.nn.Module:
        """The rewritten program as a callable module (trainable: adapter parameters keep requires_grad)."""
        return self.program.module()

    def save(self, path: str) -> None:
        from .save import save_program
        save_program(self.program, path, store=self.store)

    # ---- LoRA adapters at run time, no re-export (rewriter/lora_runtime.py): they edit `program` in place, so
    # modules made by module() afterwards see the change (the row index also reaches modules made before)
    def set_adapters(self, names, weights=None) -> dict:
        """Activate exactly these named adapters (with these weights); None or [] switches every adapter off."""
        from .lora_runtime import set_adapters
        return set_adapters(self.program, names, weights)

    def set_adapter_index(self, rows):
        """Mixed-adapter batch (after lora-batch): row i uses adapter rows[i] (name, id, or None); None: no index."""
        from .lora_runtime import set_adapter_index
        return set_adapter_index(self.program, rows)

    def swap_adapter(self, name: str, folder: str) -> list[str]:
        """Hot-swap adapter `name`'s weights from a PEFT folder (same layers and ranks)."""
        from .lora_runtime import hotswap
        return hotswap(self.program, name, folder)


def rewrite(model, example_args=None, passes="", *, example_kwargs=None, verify: bool = False,
            strict: bool = False, decompose: bool = False, codegen: str | None = None,
            instruments: list[Instrument] = (), progress=None, trust_pickle: bool = False,
            dump_kernels: str | None = None, dynamic: bool = False, jobs: int | None = None,
            device: str | None = None, dtype=None) -> RewriteResult:
    """Capture `model` (nn.Module, ExportedProgram, path, Hugging Face folder or "demo:NAME"), run the pipeline,
    export once.

    passes: a spec string ("lora{rank=4},lora-merge"), Pass objects, or a list of either.
    verify: compare outputs with the input program after every pass (contracts checked, errors reported).
    decompose: lower this package's custom ops to plain aten ops in the result.
    codegen: "triton" to lower custom ops to Triton kernels (see codegen/).
    dynamic: export with every input dimension dynamic (torch.export.Dim.AUTO), so the result accepts other
        batch sizes / sequence lengths; dims the model fixes stay static. Programs loaded from .pt2 files
        keep the dynamism they were saved with.
    jobs: worker processes for per-layer work on the CPU (default: the core count; see rewriter/parallel.py —
        results are identical whatever the count).
    device: where per-layer work runs ("cuda", "cuda:1"); default: where the weights are.
    dtype: for a Hugging Face folder or GGUF file, the dtype to load in ("auto" = the checkpoint's own, the
        default; "float32", "bfloat16", "float16").
    """
    pipeline = parse_pipeline(passes) if passes else []
    hf_options = None
    if dtype is not None:
        from .hf import is_hf_source, parse_dtype
        parse_dtype(dtype)
        if not (isinstance(model, str) and is_hf_source(model)):
            raise UserError("dtype= applies to Hugging Face folders and GGUF files; cast a module yourself "
                            "(model.to(torch.bfloat16)) before rewriting it")
        hf_options = {"dtype": dtype}
    captured: Captured = capture(model, example_args, example_kwargs, strict=strict, trust_pickle=trust_pickle,
                                 dynamic=dynamic, hf_options=hf_options)
    return run_captured(captured, pipeline, verify=verify, decompose=decompose, codegen=codegen,
                        instruments=instruments, progress=progress, dump_kernels=dump_kernels, jobs=jobs,
                        device=device)


def run_captured(captured: Captured, pipeline: list[Pass], *, verify=False, decompose=False, codegen=None,
                 instruments=(), progress=None, dump_kernels=None, resources: dict | None = None,
                 jobs: int | None = None, device: str | None = None) -> RewriteResult:
    from . import parallel
    gm = captured.gm
    inputs = flat_inputs(captured.args, captured.kwargs)
    store = captured.store
    # what passes may know about the model (calibration samples from the source's own model, tokenises files)
    known = {"source": captured.source, "dynamic": captured.dynamic, **(resources or {})}
    if store is not None:   # for passes that hold big results before they enter the program (projections.py)
        known["weight_store"] = store
    if store is not None:   # bounded memory: spill and give pages back between layers and after every pass
        progress = _tidying_progress(progress, store, gm)
        instruments = [*instruments, _TidyAfterPass(store)]
    governed = store.governed() if store is not None else contextlib.nullcontext()
    with governed, parallel.session(jobs, device):
        report = run_passes(gm, inputs, pipeline, verify=verify, instruments=instruments, progress=progress,
                            resources=known)
        if decompose:
            from .decompose import decompose_custom_ops
            decompose_custom_ops(gm, inputs)
        if codegen:
            from .lowering import lower
            lower(gm, inputs, codegen, report, dump_dir=dump_kernels)
        if store is not None:
            store.tidy(gm)
        program = export_program(gm, captured.args, captured.kwargs, captured.dynamic)
    return RewriteResult(program, captured.program, report, pipeline, captured.args, captured.kwargs, store)


def _tidying_progress(progress, store, gm):
    """Wrap the pass manager's progress hook so that the store tidies up after each layer of every pass."""
    def wrapped(items, description, *extra):    # (extra: a status callback, when the caller passes one)
        inner = progress(items, description, *extra) if progress is not None else items

        def gen():
            for item in inner:
                yield item
                store.tidy(gm)
        return gen()
    return wrapped


class _TidyAfterPass(Instrument):
    def __init__(self, store):
        self.store = store

    def after_pass(self, p, gm, result, index) -> None:
        self.store.tidy(gm)
