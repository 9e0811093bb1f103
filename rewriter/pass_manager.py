"""The pass manager: runs a pipeline of passes over one working GraphModule.

For each pass:  should_run → run → graph lint → shape check → (numerics with verify=True) → change record
→ instruments. Exact passes are checked against the program before them (so an exact pass after an
approximate one is judged on its own); every pass also reports its error against the original program.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from . import cost, lazy_weights
from .errors import InternalError, RewriteError, VerificationError, first_line
from .ir import op_name, provenance
from .params import state_snapshot
from .pass_base import Contract, Pass
from .verify import (check_same_signature, exact_agreement, exact_tolerance, propagate_shapes, relative_error,
                     run_graph, run_graph_float64)


@dataclass
class NodeChange:
    name: str
    op: str
    rule: str | None = None
    replaces: str | None = None


@dataclass
class ParamChange:
    name: str
    shape: tuple
    dtype: str
    trainable: bool


@dataclass
class PassResult:
    """What one pass did: the change record the diff and the report are rendered from."""

    name: str
    spec: str
    contract: str
    skipped: str | None = None
    seconds: float = 0.0
    nodes_added: list[NodeChange] = field(default_factory=list)
    nodes_removed: list[NodeChange] = field(default_factory=list)
    params_added: list[ParamChange] = field(default_factory=list)
    params_removed: list[ParamChange] = field(default_factory=list)
    params_changed: list[ParamChange] = field(default_factory=list)
    params_frozen: list[str] = field(default_factory=list)      # only requires_grad changed: True -> False
    params_unfrozen: list[str] = field(default_factory=list)    # False -> True
    params_before: dict = field(default_factory=dict)
    params_after: dict = field(default_factory=dict)
    flops_before: Any = 0
    flops_after: Any = 0
    error_vs_previous: float | None = None
    error_vs_original: float | None = None
    tolerance: float | None = None
    sites: list[dict] = field(default_factory=list)   # per-layer entries: {"site", "status", ...}
    messages: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.nodes_added or self.nodes_removed or self.params_added or self.params_removed
                    or self.params_changed or self.params_frozen or self.params_unfrozen)


@dataclass
class Report:
    passes: list[PassResult] = field(default_factory=list)
    flops_before: Any = 0
    flops_after: Any = 0
    params_before: dict = field(default_factory=dict)
    params_after: dict = field(default_factory=dict)
    verified: bool = False
    error: float | None = None  # final error vs the original program (verify=True)

    def to_json(self) -> dict:
        from .report import report_to_json
        return report_to_json(self)


class PassContext:
    """What a pass sees: the working GraphModule, example inputs, and ways to report per-site results."""

    def __init__(self, gm: fx.GraphModule, inputs: list, pass_obj: Pass, result: PassResult,
                 progress: Callable | None = None, teacher: fx.GraphModule | None = None,
                 resources: dict | None = None):
        self.gm = gm
        self.inputs = inputs          # flat example inputs, in placeholder order
        self.pass_obj = pass_obj
        self.result = result
        self._progress = progress
        # the program as it was before the pipeline (a frozen copy), kept only when a pass of the pipeline
        # declares `needs_teacher` (it costs a second copy of the weights)
        self.teacher = teacher
        # one dict per pipeline, shared by its passes: what the entry point knows about the model ("source": the
        # alias/path it came from, "dynamic": whether its shapes may vary, optionally "tokenizer", "hf_model")
        # and what passes cache for the passes after them (rewriter/calibration.py keeps its data and statistics
        # here, so a pipeline samples its calibration data and captures layer statistics once)
        self.resources = resources if resources is not None else {}

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def site(self, name: str, status: str = "rewritten", **info) -> None:
        """Record one matched site (a layer): status is "rewritten" or "skipped"; info holds figures/reasons."""
        self.result.sites.append({"site": name, "status": status, **info})

    def skip(self, name: str, reason: str) -> None:
        self.site(name, "skipped", reason=reason)

    def message(self, text: str) -> None:
        self.result.messages.append(text)

    def progress(self, items, description: str, status: Callable[[], str] | None = None):
        """Iterate `items` with a progress bar when a console is attached; `status()` (optional) is shown beside
        the bar and re-read after every item (a training loss, say)."""
        if self._progress is None:
            return items
        if status is None:
            return self._progress(items, f"{self.pass_obj.name}: {description}")
        return self._progress(items, f"{self.pass_obj.name}: {description}", status)

    def map_layers(self, fn: Callable, items: list[tuple], description: str) -> list:
        """`[fn(*item) for item in items]` — the per-layer work of a pass (a projection, a fit), in order.

        The one place per-layer work runs, so that where it runs (this process, a process pool, a GPU) is decided
        here and nowhere else. Hence the rules for callers: `fn` is a module-level function, each item a tuple of
        tensors / numbers / strings (picklable), results tensors or plain data; anything random is seeded from the
        item (a per-layer seed), never from global state, so the result is the same wherever it ran."""
        from .parallel import current
        return current().map(fn, items, lambda it: self.progress(it, description))

    def activations(self, nodes: list[fx.Node]) -> dict[fx.Node, Any]:
        """Values of `nodes` on the example inputs (runs the current graph once)."""
        wanted = set(nodes)
        captured: dict[fx.Node, Any] = {}

        class Capture(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n in wanted:
                    captured[n] = value.detach() if isinstance(value, torch.Tensor) else value
                return value

        with torch.no_grad(), lazy_weights.reading(self.resources.get("weight_store")):
            Capture(self.gm).run(*self.inputs)
        return captured


class Instrument:
    """Hooks around each pass (TVM's PassInstrument): timing, printing, dumping."""

    def before_pass(self, p: Pass, gm: fx.GraphModule) -> None:
        pass

    def after_pass(self, p: Pass, gm: fx.GraphModule, result: PassResult, index: int) -> None:
        pass


def _node_changes(nodes, pass_name: str) -> list[NodeChange]:
    out = []
    for n in nodes:
        prov = provenance(n) or {}
        if n.op == "get_attr":
            continue
        out.append(NodeChange(n.name, op_name(n) if n.op == "call_function" else n.op,
                              prov.get("rule") if prov.get("pass") == pass_name else None, prov.get("replaces")))
    return out


def _param_change(name, tensor, trainable) -> ParamChange:
    return ParamChange(name, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""), trainable)


def run_passes(gm: fx.GraphModule, inputs: list, passes: list[Pass], *, verify: bool = False,
               instruments: list[Instrument] = (), progress: Callable | None = None,
               resources: dict | None = None) -> Report:
    """Run `passes` in order over `gm` (modified in place) and return the report. `resources`: see
    PassContext.resources (shared by every pass of this run)."""
    report = Report()
    resources = dict(resources or {})
    reference = propagate_shapes(gm, inputs)
    report.flops_before = cost.program_flops(gm)
    report.params_before = cost.program_params(gm)
    reading = lambda: lazy_weights.reading(resources.get("weight_store"))     # forwards that write no weight
    with reading():
        original_outputs = previous_outputs = run_graph(gm, inputs) if verify else None
    teacher = _frozen_copy(gm, resources.get("weight_store")) \
        if any(getattr(p, "needs_teacher", False) for p in passes) else None
    done: list[str] = []
    for index, p in enumerate(passes):
        result = PassResult(p.name, p.spec(), p.contract.value)
        label = f'pass "{p.spec()}"' + (f" (after {', '.join(done)})" if done else "")
        reason = p.should_run(_ReadOnlyContext(gm))
        if reason is not None:
            result.skipped = reason
            report.passes.append(result)
            done.append(p.spec())
            continue
        for inst in instruments:
            inst.before_pass(p, gm)
        # the float64 reference of an exact pass's input program, for ill-conditioned examples (verify.exact_agreement)
        with reading():
            truth = run_graph_float64(gm, inputs) if verify and p.contract is Contract.EXACT else None
        nodes_before = set(gm.graph.nodes)
        state_before = state_snapshot(gm)
        result.flops_before = cost.program_flops(gm)
        result.params_before = cost.program_params(gm)
        start = time.perf_counter()
        try:
            p.run(PassContext(gm, inputs, p, result, progress, teacher, resources))
        except RewriteError:
            raise
        except Exception as e:
            raise InternalError(f"{label} crashed: {type(e).__name__}: {first_line(e)} — a bug in rewrite, "
                                "not in your model (run with --debug for the traceback)") from e
        gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
        try:
            gm.graph.lint()
        except Exception as e:
            raise VerificationError(f"{label} produced an ill-formed graph: {e}") from e
        gm.recompile()
        result.seconds = time.perf_counter() - start
        # ---- shapes, always
        try:
            got = propagate_shapes(gm, inputs)
        except Exception as e:
            raise VerificationError(f"{label} produced a graph whose shapes do not check: {e}") from e
        check_same_signature(reference, got, label)
        # ---- change record
        nodes_after = set(gm.graph.nodes)
        result.nodes_added = _node_changes([n for n in gm.graph.nodes if n not in nodes_before], p.name)
        result.nodes_removed = _node_changes([n for n in nodes_before if n not in nodes_after], p.name)
        state_after = state_snapshot(gm)
        for name, (t, trainable) in state_after.items():
            if name not in state_before:
                result.params_added.append(_param_change(name, t, trainable))
            elif state_before[name][0] is not t:
                result.params_changed.append(_param_change(name, t, trainable))
            elif state_before[name][1] != trainable:
                (result.params_unfrozen if trainable else result.params_frozen).append(name)
        for name, (t, trainable) in state_before.items():
            if name not in state_after:
                result.params_removed.append(_param_change(name, t, trainable))
        result.flops_after = cost.program_flops(gm)
        result.params_after = cost.program_params(gm)
        # ---- numerics
        if verify:
            with reading():
                outputs = run_graph(gm, inputs)
            result.error_vs_previous = relative_error(previous_outputs, outputs)
            result.error_vs_original = relative_error(original_outputs, outputs)
            ok = True
            if p.contract is Contract.EXACT:
                result.tolerance = exact_tolerance(outputs, gm)
                ok, _ = exact_agreement(previous_outputs, outputs, truth, result.tolerance)
            elif p.contract is Contract.APPROXIMATE and p.error_bound is not None:
                result.tolerance = p.error_bound
                ok = result.error_vs_previous <= result.tolerance
            if not ok:
                report.passes.append(result)
                raise VerificationError(
                    f"{label} broke its {p.contract.value} contract: output relative error "
                    f"{result.error_vs_previous:.3g} > {result.tolerance:.3g}")
            previous_outputs = outputs
        report.passes.append(result)
        done.append(p.spec())
        for inst in instruments:
            inst.after_pass(p, gm, result, index)
    report.flops_after = cost.program_flops(gm)
    report.params_after = cost.program_params(gm)
    if verify:
        report.verified = True
        report.error = relative_error(original_outputs, previous_outputs)
    return report


def _frozen_copy(gm: fx.GraphModule, store=None) -> fx.GraphModule:
    """A copy of the program with its own (frozen) parameters: the teacher a distilling pass learns from. With a
    weight store (a checkpoint loaded memory-mapped) the copy's big weights are mapped, not held
    (rewriter.lazy_weights.WeightStore.frozen_twins)."""
    import copy
    teacher = copy.deepcopy(gm, store.frozen_twins(gm) if store is not None else {})
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _is_impure(node: fx.Node) -> bool:
    # keep export's guard call and anything with side effects
    return node.op in ("placeholder", "output", "call_module") or node.is_impure()


class _ReadOnlyContext:
    def __init__(self, gm):
        self.gm = gm
