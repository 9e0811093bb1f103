"""Measured selection: every call of a `rewrite_triton::` op runs the fastest of its implementations on this GPU.

Why: a Triton template is only worth launching where it beats the PyTorch path it replaces (cuBLAS, SDPA,
index_select). So each op offers candidates — its aten path and its Triton template in a few tile configs — and
on the first call per key they are timed on the user's device and the fastest is used from then on (the pattern
of inductor's max-autotune algorithm selection and torchao's autoquant). The aten path is always a candidate, so
selection can only help.

    key   = (op, device name, dtype, shape bucket, torch version, triton version, codegen version)
            shape bucket: the row count (all leading dims of the row-carrying tensors) rounded up to a power of
            two, every other dim exact, plus the op's flags (bias? activation? residual?)
    dispatch(op, candidates, tensors, bucket)
        mode = REWRITE_KERNELS: auto (default) | triton | aten       (forces a side: the pool is that kind only)
        one candidate in the pool → run it
        not measurable here (below) → the pool's first candidate (templates list their heuristic default first)
        else: timings from memory, else from disk, else measured now → run the fastest in the pool

Measuring (`_measure`): each candidate runs once (a candidate that raises — a compile error, a launch over the
shared-memory limit — is skipped with the exception's first line as its note), its output is compared with the
aten candidate's (a wrong result is skipped too, with the error as the note), then it is timed by the timer:
on CUDA `cuda_timer` (CUDA events, the L2 cache flushed before every repetition, median over ≥ 5 repetitions
of a ~20 ms budget). Timings are stored per candidate, so a later call under another mode reuses them and
measures only what is missing.

On disk: one JSON file per key in `<kernel cache dir>/selection/` (codegen.cache.cache_dir(): beside the
generated kernels), written atomically (temp file + os.replace: concurrent processes never read half a file;
the last writer wins with a complete entry). Delete the directory to re-measure.

Where nothing is measured:
- under the Triton interpreter (CPU) `auto` runs the template: interpreter timings say nothing about a GPU
  (numpy-emulated kernels are ~10⁴× slower than aten), and the interpreter exists to run the kernels — the
  kernel tests rely on it. `aten` still forces the aten path there.
- while a CUDA stream is being captured into a graph, timing is impossible: the stored choice if there is one,
  else the aten path.
Tests inject a timer (`use_timer`), which turns measuring on anywhere — the CPU interpreter included — so the
logic (fastest picked, cache reused across calls and processes, broken candidates skipped, env override
respected) runs in CI without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from rewriter.errors import UserError

from . import cache
from .runtime import interpreter

MODES = ("auto", "triton", "aten")
ENV = "REWRITE_KERNELS"
SELECT_VERSION = "1"


def mode() -> str:
    """REWRITE_KERNELS, checked: auto (default), triton or aten."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise UserError(f'{ENV}="{os.environ.get(ENV)}" is not one of {", ".join(MODES)} (auto: the fastest on '
                        f"this GPU; triton / aten: force that side)")
    return value


class Candidate(NamedTuple):
    """One implementation of an op call: `run()` computes the op's output for the current arguments.
    kind: "aten" (PyTorch ops only) or "triton" (launches at least one Triton kernel). (A NamedTuple: every call
    of an op builds its candidate list, so construction must cost next to nothing.)"""
    name: str
    kind: str
    run: Callable[[], torch.Tensor]


@dataclass
class Decision:
    """What was chosen for one key and why: per-candidate timings (ms) and notes (skipped candidates)."""
    op: str
    key: dict
    timings_ms: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)     # candidate name -> "aten" | "triton"
    source: str = "measured"          # measured | disk | default (nothing measured: see module docstring)
    winner: str = ""

    def best(self, names) -> str | None:
        timed = [(self.timings_ms[n], n) for n in names if n in self.timings_ms]
        return min(timed)[1] if timed else None

    def is_aten(self, name: str) -> bool:
        return self.kinds.get(name, "aten" if name.startswith("aten") else "triton") == "aten"

    def aten_ms(self) -> float | None:
        ms = [t for n, t in self.timings_ms.items() if self.is_aten(n)]
        return min(ms) if ms else None

    def summary(self) -> str:
        """One line for reports: 'triton[…] 1.42× vs aten' / 'aten (triton[…] 0.8×)' / 'triton (not measured…)'."""
        if not self.timings_ms:
            return f"{self.winner} ({self.notes.get('*', 'not measured')})"
        aten = self.aten_ms()
        win = self.timings_ms.get(self.winner)
        if aten is None or win is None:
            return f"{self.winner} ({win:.3g} ms)" if win is not None else self.winner
        if self.is_aten(self.winner):
            others = [t for n, t in self.timings_ms.items() if not self.is_aten(n)]
            tail = f"; best triton {aten / min(others):.2f}×" if others else ""
            return f"{self.winner} ({win:.3g} ms{tail})"
        return f"{self.winner} {aten / win:.2f}× vs aten ({win:.3g} ms)"


# ------------------------------------------------------------------------------------------------ timers

Timer = Callable[[Candidate], float]
_TIMER: list = [None]            # an injected timer (tests), or None: cuda_timer on CUDA, nothing elsewhere


@contextlib.contextmanager
def use_timer(timer: Timer):
    """Within: candidates are timed by `timer(candidate) -> ms` on any device (the interpreter included)."""
    old = _TIMER[0]
    _TIMER[0] = timer
    try:
        yield
    finally:
        _TIMER[0] = old


@functools.lru_cache(maxsize=1)
def _flush_buffer(device_index: int) -> torch.Tensor | None:
    """256 MiB (more than any GPU's L2) to overwrite before each timed repetition; None when the GPU has no room
    for it (then repetitions run L2-warm, the same for every candidate)."""
    try:
        return torch.empty(64 << 20, dtype=torch.int32, device=f"cuda:{device_index}")
    except torch.cuda.OutOfMemoryError:
        return None


def cuda_timer(candidate: Candidate, budget_ms: float = 20.0) -> float:
    """Median ms of `candidate.run()` on the current CUDA stream: L2 flushed before each repetition (weights
    are not L2-resident between a layer's calls in a real model), CUDA events around the call alone."""
    flush = _flush_buffer(torch.cuda.current_device())
    candidate.run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    candidate.run()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    reps = int(min(100, max(5, budget_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        if flush is not None:
            flush.zero_()
        s.record()
        candidate.run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _timer_for(device: torch.device) -> Timer | None:
    if _TIMER[0] is not None:
        return _TIMER[0]
    if device.type == "cuda" and not interpreter():
        if torch.cuda.is_current_stream_capturing():
            return None
        return cuda_timer
    return None


# ------------------------------------------------------------------------------------------------ keys

def pow2_at_least(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def bucket(args, row_args=()) -> tuple:
    """The shape bucket of an op call: for the argument positions in `row_args` (tensors whose leading dims
    are rows) the row count rounded up to a power of two and the last dim; other tensors' shapes exact (and
    whether they are contiguous: strided operands can change the winner); None as is; floats as "f" (a scale
    value does not change timings); other values (ints, strings, bools) as is."""
    parts = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if i in row_args and a.dim() >= 1:
                last = a.shape[-1]
                rows = a.numel() // last if last else 0
                parts.append(("rows", pow2_at_least(rows), last, a.stride(-1) == 1))
            else:
                parts.append((tuple(a.shape), a.is_contiguous()))
        elif isinstance(a, float):
            parts.append("f")
        elif isinstance(a, (list, tuple)):
            parts.append(bucket(a, range(len(a))))
        else:
            parts.append(a)
    return tuple(parts)


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter" if interpreter() else device.type


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    return {"torch": torch.__version__, "triton": tv, "codegen": cache.CODEGEN_VERSION, "select": SELECT_VERSION}


def full_key(op: str, device: torch.device, dtype: torch.dtype, shape_bucket: tuple) -> dict:
    return {"op": op, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "bucket": json.loads(json.dumps(shape_bucket, default=str)), **_versions()}


def _key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ storage

_MEMO: dict = {}                 # (op, device, dtype, bucket) -> Decision      (this process)
_ABSENT: set = set()             # keys with no decision on disk (not looked up again until one is measured)
_CHOSEN: dict = {}               # ((op, device, dtype, bucket), mode) -> (candidate name, Decision)
_LAST: dict = {}                 # op -> the Decision behind its latest call
_FAST: dict = {}                 # (caller's signature key, mode) -> (settled candidate name, Decision or None)


def selection_dir():
    return cache.cache_dir() / "selection"


def _load(key: dict) -> Decision | None:
    path = selection_dir() / f"{_key_id(key)}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != key:
        return None
    return Decision(op=key["op"], key=key, timings_ms=dict(data.get("timings_ms", {})),
                    notes=dict(data.get("notes", {})), kinds=dict(data.get("kinds", {})), source="disk")


def _store(decision: Decision) -> None:
    path = selection_dir() / f"{_key_id(decision.key)}.json"
    text = json.dumps({"key": decision.key, "timings_ms": decision.timings_ms, "notes": decision.notes,
                       "kinds": decision.kinds, "winner": decision.winner, "time": time.time()}, indent=1,
                      sort_keys=True)
    try:
        cache.write_atomic(path, text)
    except OSError:
        pass                      # a read-only cache dir: the choice still holds for this process


def clear_memory() -> None:
    """Forget this process's decisions (the disk cache stays)."""
    _MEMO.clear()
    _ABSENT.clear()
    _CHOSEN.clear()
    _LAST.clear()
    _FAST.clear()


def decisions() -> list[Decision]:
    return list(_MEMO.values())


def lookup(op: str, device: torch.device, dtype: torch.dtype, shape_bucket: tuple) -> Decision | None:
    """The decision for a key, from memory or disk, without measuring anything."""
    memo = (op, device, dtype, shape_bucket)
    if memo in _MEMO:
        return _MEMO[memo]
    for (key, _), (_, decision) in _CHOSEN.items():
        if key == memo:
            return decision
    return _load(full_key(op, device, dtype, shape_bucket))


# ------------------------------------------------------------------------------------------------ measuring

def _close(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when `got` matches `want` to the dtype's accuracy (relative to want's largest magnitude), else why."""
    if got.shape != want.shape:
        return f"wrong result: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().float(), want.detach().float()
    finite = torch.isfinite(w)
    if not torch.equal(torch.isfinite(g), finite):
        return "wrong result: non-finite values where the aten path has none (or the reverse)"
    if not finite.any():
        return None
    scale = w[finite].abs().max().item() or 1.0
    err = (g[finite] - w[finite]).abs().max().item() / scale
    tol = 1e-4 if want.dtype == torch.float32 else 5e-2
    return None if err <= tol else f"wrong result: max error {err:.3g} of the largest magnitude > {tol}"


def _measure(decision: Decision, pool: list[Candidate], timer: Timer, reference: Candidate | None) -> None:
    want = None
    if reference is not None and reference.name not in decision.notes:
        try:
            want = reference.run()
        except Exception as e:  # noqa: BLE001 — an aten path that fails here is a candidate like any other
            decision.notes[reference.name] = f"failed: {type(e).__name__}: {_first_line(e)}"
    for cand in pool:
        decision.kinds[cand.name] = cand.kind
        if cand.name in decision.timings_ms or cand.name in decision.notes:
            continue
        try:
            out = cand.run()
            if want is not None and cand is not reference:
                problem = _close(out, want)
                if problem:
                    decision.notes[cand.name] = problem
                    continue
            ms = float(timer(cand))
        except Exception as e:  # noqa: BLE001 — compile errors, OutOfResources, …: skipped with a note
            decision.notes[cand.name] = f"failed: {type(e).__name__}: {_first_line(e)}"
            continue
        if math.isfinite(ms):
            decision.timings_ms[cand.name] = ms


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else ""


def choose(op: str, candidates: list[Candidate], device: torch.device, dtype: torch.dtype,
           shape_bucket: tuple) -> tuple[Candidate, Decision | None]:
    """The candidate to run for this call (see the module docstring), and the decision behind it (None when
    the pool had one candidate). After the first call per key and mode this is two dict lookups."""
    m = mode()
    pool = [c for c in candidates if m == "auto" or c.kind == m]
    if not pool:
        raise UserError(f"{op}: no {m} implementation for these inputs (unset {ENV} to choose automatically)")
    if len(pool) == 1:
        return pool[0], None
    memo = (op, device, dtype, shape_bucket)
    chosen = _CHOSEN.get((memo, m))
    if chosen is not None:
        for c in pool:
            if c.name == chosen[0]:
                return c, chosen[1]
    decision = _MEMO.get(memo)
    if decision is None and memo not in _ABSENT:
        decision = _load(full_key(op, device, dtype, shape_bucket))
        if decision is None:
            _ABSENT.add(memo)
        else:
            _MEMO[memo] = decision
    names = [c.name for c in pool]
    complete = decision is not None and all(n in decision.timings_ms or n in decision.notes for n in names)
    timer = None if complete else _timer_for(device)
    if timer is None and not complete:
        if decision is not None and decision.best(names) is not None:     # a partial stored decision
            return _remember(memo, m, pool, decision.best(names), decision)
        fallback = pool[0]
        if device.type == "cuda" and not interpreter():      # capturing a CUDA graph: the safe side
            fallback = next((c for c in pool if c.kind == "aten"), pool[0])
        why = "interpreter: not measured" if interpreter() else "not measured (CUDA graph capture)"
        return fallback, Decision(op, {}, notes={"*": why}, source="default", winner=fallback.name)
    if timer is not None:
        if decision is None:
            decision = Decision(op, full_key(op, device, dtype, shape_bucket))
        reference = next((c for c in candidates if c.kind == "aten"), None)
        _measure(decision, [c for c in pool if c.name not in decision.timings_ms and c.name not in decision.notes],
                 timer, reference)
        decision.source = "measured"
        decision.winner = decision.best(names) or ""
        _store(decision)
        _MEMO[memo] = decision
        _ABSENT.discard(memo)
    best = decision.best(names)
    if best is None:              # every candidate of the pool failed: the aten path is the safe answer
        aten = next((c for c in candidates if c.kind == "aten"), pool[0])
        decision.winner = aten.name
        _CHOSEN[(memo, m)] = (aten.name, decision)
        return aten, decision
    return _remember(memo, m, pool, best, decision)


def _remember(memo, m, pool, name, decision):
    decision.winner = name
    _CHOSEN[(memo, m)] = (name, decision)
    return next(c for c in pool if c.name == name), decision


def dispatch(op: str, candidates: list[Candidate], device: torch.device, dtype: torch.dtype,
             shape_bucket: tuple, fast_key=None) -> torch.Tensor:
    """Run the chosen candidate (the measuring calls already computed it: its output is not reused, the
    selected candidate runs once more so the result never depends on which candidates were timed).

    `fast_key` (hashable; codegen.ops passes the op and its arguments' signature, which determine the device,
    dtype and bucket): once a call with it has a settled choice — measured, loaded or a one-candidate pool, not a
    fallback while nothing could be measured — later calls go straight to that candidate by name, skipping the
    bucket's hashing and the pool (on a GPU a small kernel runs in less time than its host path)."""
    m = mode()
    if fast_key is not None:
        settled = _FAST.get((fast_key, m))
        if settled is not None:
            name, decision = settled
            for c in candidates:
                if c.name == name:
                    if decision is not None:
                        _LAST[op] = decision
                    return c.run()
    cand, decision = choose(op, candidates, device, dtype, shape_bucket)
    if decision is not None:
        _LAST[op] = decision
    if fast_key is not None and (decision is None or decision.source != "default"):    # settled, not a fallback
        if len(_FAST) >= 8192:
            _FAST.clear()
        _FAST[(fast_key, m)] = (cand.name, decision)
    return cand.run()


def last_decision(op: str) -> Decision | None:
    """The decision behind the latest call of `op` in this process (benches report it)."""
    return _LAST.get(op)


def would_measure(device: torch.device) -> bool:
    """Whether a call on `device` measures its candidates now (auto mode and a timer for the device)."""
    return mode() == "auto" and _timer_for(device) is not None


def site_summary(op: str, device: torch.device, dtype: torch.dtype, shape_bucket: tuple) -> str:
    """Which implementation a call with this key runs and why, in one line (the `--codegen triton` report's
    "impl" column): the measured winner and its speed-up over the best aten candidate, or why nothing was
    measured."""
    m = mode()
    if m != "auto":
        return f"{m} ({ENV}={m})"
    decision = lookup(op, device, dtype, shape_bucket)
    if decision is not None and decision.timings_ms:
        return decision.summary()
    if device.type == "cuda" and not interpreter():
        return "not measured yet: chosen on the first call"
    if interpreter():
        return "triton (interpreter: not measured)"
    return "aten (no GPU)"
