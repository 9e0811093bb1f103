"""Where per-layer work runs: in this process, in a pool of worker processes, or on a GPU.

`PassContext.map_layers(fn, items, description)` is the one place a pass runs its per-layer work (a projection, a
fit, a calibration statistic); it hands the work to the `Executor` of the current run, set up by
`rewriter.api.run_captured` (`jobs=`, `device=`; CLI `--jobs N`, `--device cuda`):

    with parallel.session(jobs=2, device=None):
        run_passes(...)            # every map_layers call inside uses the same executor (one worker pool)

How an item runs, in order of precedence:
    GPU        `device="cuda"` (or "cuda:1"): each item's tensors are copied there, `fn` runs in this process, the
               tensors of its result come back to the device the item's tensors came from. An item whose tensors
               already live on a GPU (a model on the GPU) runs there, in this process, whatever `jobs` says.
    pool       `jobs` > 1 and more than one item holding ≥ POOL_MIN_BYTES of tensors: a pool of `jobs` worker
               processes (forkserver: workers do not inherit this process's threads or open files), items fed
               in order with at most 2·jobs in flight (a few layers' worth of memory), results in item order.
    here       otherwise: in this process, one item after another.

Results do not depend on where they ran: `fn` always runs with ONE intra-op thread (in the workers and here), so
BLAS/LAPACK reduce in the same order whatever the worker count — `jobs=1` and `jobs=2` give bit-identical results
(tests/test_parallel.py checks SVDs and eigendecompositions). Parallelism is across layers, not inside one.

Rules for callers (checked where cheap): `fn` is a module-level function (pickled by name); an item is a tuple of
tensors / numbers / strings / None, or lists, tuples, dicts and dataclasses of them (a `Factored`, a `BCQWeight`);
results are the same kinds; anything
random is seeded from the item. Tensors travel to workers as raw bytes (not torch's shared-memory pickling, which
would move the caller's weight storage into shared memory for good): each item costs one copy of its tensors
while in flight. Build items from the stored tensors themselves (views), convert inside `fn`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .errors import UserError

# below this many tensor bytes in all items together, a pool costs more (worker start-up) than it saves
POOL_MIN_BYTES = 4 * 2**20
IN_FLIGHT_PER_JOB = 2


def default_jobs() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_device(device: str | None) -> torch.device | None:
    """None, or a torch.device this process can use; a one-line UserError otherwise."""
    if device is None or device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"bad --device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device here (torch {torch.__version__}"
                            f"{', built without CUDA' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    return dev


# ---- moving items and results ---------------------------------------------------------------------------------
def _map_tensors(obj, fn: Callable[[torch.Tensor], Any]):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):   # e.g. projections.Factored, bcq.BCQWeight
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _tensors(obj) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(obj, found.append)
    return found


def home_device(item) -> torch.device:
    """Where an item's results go back to: the device of its first tensor (the CPU when it has none)."""
    tensors = _tensors(item)
    return tensors[0].device if tensors else torch.device("cpu")


@dataclass(frozen=True)
class Packed:
    """A tensor as plain bytes, for the trip to or from a worker."""

    dtype: str
    shape: tuple
    data: bytes
    requires_grad: bool = False


def pack(obj):
    def one(t: torch.Tensor) -> Packed:
        grad = t.requires_grad
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return Packed(str(t.dtype).replace("torch.", ""), tuple(t.shape), data, grad)
    return _map_tensors(obj, one)


def unpack(obj):
    if isinstance(obj, Packed):
        dtype = getattr(torch, obj.dtype)
        if not obj.data:
            return torch.empty(obj.shape, dtype=dtype, device="cpu")
        t = torch.frombuffer(bytearray(obj.data), dtype=torch.uint8).view(dtype).reshape(obj.shape)
        return t.requires_grad_(obj.requires_grad) if obj.requires_grad else t
    if isinstance(obj, tuple):
        return tuple(unpack(o) for o in obj)
    if isinstance(obj, list):
        return [unpack(o) for o in obj]
    if isinstance(obj, dict):
        return {k: unpack(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not isinstance(obj, Packed):
        return dataclasses.replace(obj, **{f.name: unpack(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


@contextlib.contextmanager
def one_thread():
    """Run the body with one intra-op thread (see the module docstring: results independent of the pool size)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_picklable(fn: Callable) -> None:
    """fn must be found again by name in a worker: a module-level function, not a lambda or a closure."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in name:
        raise TypeError(f"map_layers needs a module-level function, got {fn!r} (a lambda, closure or method "
                        "cannot be sent to a worker process)")
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part, None)
    if target is not fn:
        raise TypeError(f"map_layers: {module}.{name} does not name {fn!r}")


# ---- worker side ------------------------------------------------------------------------------------------------
def _init_worker() -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    # a worker's per-layer temporaries are big (a 5632-wide calibrated Monarch fit: float64 Grams of 250 MB) and
    # glibc would keep the freed ones in its heap (measured: a fit peaked at +1.11 GiB instead of +0.73 GiB)
    from .lazy_weights import limit_heap_growth
    limit_heap_growth()


def _run_packed(fn: Callable, packed_item):
    """In a worker: unpack, run with one thread (set by _init_worker), pack the result."""
    return pack(fn(*unpack(packed_item)))


# ---- the executor -----------------------------------------------------------------------------------------------
@dataclass
class Executor:
    """Runs `fn` over items (see the module docstring). One pool per executor, started on first use."""

    jobs: int = 1
    device: torch.device | None = None
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)
    stats: dict = field(default_factory=lambda: {"items": 0, "pool_items": 0, "device_items": 0})

    def map(self, fn: Callable, items: Iterable[tuple], progress: Callable[[Iterable], Iterable] = iter) -> list:
        """[fn(*item) for item in items], in order; `progress` wraps the iteration over items (a progress bar,
        the memory tidy-up between layers). A generator of items is consumed as the window advances."""
        if self.device is not None and self.device.type != "cpu":
            return [self._on_device(fn, item, self.device) for item in progress(items)]
        if self.jobs > 1 and (_is_lazy(items) or self._worth_a_pool(items)):
            return self._in_pool(fn, progress(items))
        return [self._here(fn, item) for item in progress(items)]

    # -- the three ways
    def _here(self, fn, item):
        self.stats["items"] += 1
        if any(t.device.type not in ("cpu", "meta") for t in _tensors(item)):
            self.stats["device_items"] += 1
            return fn(*item)                       # the model lives on a GPU: run there
        with one_thread():
            return fn(*item)

    def _on_device(self, fn, item, device: torch.device):
        self.stats["items"] += 1
        self.stats["device_items"] += 1
        home = home_device(item)
        moved = _map_tensors(item, lambda t: t.to(device))
        result = fn(*moved)
        return _map_tensors(result, lambda t: t.to(home))

    def _worth_a_pool(self, items: list) -> bool:
        if len(items) < 2:
            return False
        total = sum(t.numel() * t.element_size() for t in _tensors(items))
        return total >= POOL_MIN_BYTES

    def _in_pool(self, fn, items: Iterable[tuple]) -> list:
        pool = None
        window: deque[tuple[tuple, Future]] = deque()
        results: list = []
        limit = IN_FLIGHT_PER_JOB * self.jobs

        def collect_oldest():
            item, future = window.popleft()
            if any(t.device.type not in ("cpu", "meta") for t in _tensors(item)):
                results.append(future.result())
                return
            results.append(_map_tensors(unpack(future.result()), lambda t: t.to(home_device(item))))

        for item in items:
            self.stats["items"] += 1
            if any(t.device.type not in ("cpu", "meta") for t in _tensors(item)):
                done: Future = Future()
                done.set_result(fn(*item))         # GPU-resident item: run here, keep the order
                window.append((item, done))
            else:
                if pool is None:
                    check_picklable(fn)
                    pool = self._get_pool()
                self.stats["pool_items"] += 1
                with _main_module_hidden():        # a submit may start a worker
                    future = pool.submit(_run_packed, fn, pack(item))
                window.append((item, future))
            while len(window) > limit:
                collect_oldest()
        while window:
            collect_oldest()
        return results

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch"])
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_init_worker)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@contextlib.contextmanager
def _main_module_hidden():
    """Start workers without re-running the caller's main script in them: multiprocessing re-imports `__main__`
    in a new worker so that functions defined there unpickle, which re-runs a script that lacks an
    `if __name__ == "__main__":` guard. map_layers functions are module-level functions of importable modules
    (check_picklable), so workers never need `__main__`: hide where it came from while they start."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _is_lazy(items) -> bool:
    """A generator/iterator (items built as they are consumed) rather than a sized collection."""
    return not hasattr(items, "__len__")


_CURRENT: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("rewrite_executor", default=None)


def current() -> Executor:
    """The executor of the run in progress; outside a run, items run here, one after another."""
    return _CURRENT.get() or Executor()


@contextlib.contextmanager
def session(jobs: int | None = None, device: str | torch.device | None = None):
    """Install an executor for the body (one pool for every pass of a run); the pool is shut down at the end."""
    if jobs is None:
        jobs = default_jobs()
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {jobs!r}")
    dev = device if isinstance(device, torch.device) else check_device(device)
    executor = Executor(jobs=jobs, device=dev)
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)
        executor.close()
