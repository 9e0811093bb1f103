"""Bounded memory for big checkpoints: every large weight is file-backed, and pages go back after use.

The rule (measured by `python -m bench.scale`, see the README): rewriting a checkpoint of S bytes peaks at about
S·(pages touched since the last release) + a few layers + the runtime (~1 GiB), never at "the model, copied".

How:
1. **Weights are views of the memory-mapped shards.** rewriter.hf loads a folder in the checkpoint's own dtype;
   transformers then binds each parameter as a view of the safetensors file mapping (private, copy-on-write): no
   byte is read until something touches it, and a touched page is file-backed — the kernel can drop it again.
2. **New big tensors go to disk too.** A pass that replaces W by something as big (a merged weight, an int8
   correction, Monarch factors) creates ordinary anonymous memory; between layers `tidy` writes each new CPU tensor
   of ≥ `spill_bytes` to a scratch file, maps it back (private, writable) and swaps it in with `tensor.data = …`:
   the same Python object (ties, references held by the pass, requires_grad all survive) now backed by the file.
   The scratch file is unlinked at once; its blocks go when the last view goes.
3. **Pages go back.** `release` unmaps the resident pages of every checkpoint and scratch mapping that was never
   written (madvise MADV_DONTNEED): clean file pages leave this process but stay in the page cache, so reading
   them again costs a minor fault, not a disk read. A mapping with pages written in place (copy-on-write: they
   are anonymous now) gets MADV_PAGEOUT instead, which keeps those — nothing is ever lost (see release_mappings
   for when unmapping is safe).

When (all from rewriter.api / rewriter.capture / rewriter.save, no pass needs to know): after the finite-weights
check of each tensor at capture, between the layers of every pass (its `ctx.progress` loop or `map_layers`), after
every pass, before the final export, and while saving after each tensor is written. A whole-model forward run
(the activations a pass calibrates on, a `--verify` check) touches every weight between two of those points, so
while a run is in progress a **governor** thread also watches the file-backed resident size and releases the
mappings whenever it has grown by more than `GOVERNOR_BUDGET` (256 MiB) — measured on TinyLlama-1.1B, the one
activation run of `monarch` otherwise added S (2.05 GiB) to the peak. The governor runs beside the pass, so it
only pages out (evicting clean pages from the page cache too), except inside `reading()` phases — calibration
sampling and statistics, activations, verification: forwards that write no weight — where it unmaps clean
mappings like `release`. A distillation pass's teacher costs no
memory either: its weights are second mappings of the checkpoint (or scratch copies of weights changed in place;
`frozen_twins`), released like the model's. What still costs memory: a `--dtype` other than the checkpoint's
(converted copies are spilled after capture, so they cost disk, not memory, once the first pass starts).

The scratch folder: $REWRITE_SCRATCH, else <cache>/scratch under $REWRITE_CACHE (~/.cache/rewrite); never a
tmpfs (that would be memory again). Linux only (/proc/self/maps, madvise); elsewhere the store does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch

MADV_PAGEOUT = 21          # Linux ≥ 5.4: reclaim these pages (file pages dropped, anonymous ones swapped or kept)
MADV_DONTNEED = 4          # unmap these pages (a private mapping's written pages would be lost: see drop_twin_pages)
GOVERNOR_BUDGET = 256 * 2**20   # file-backed pages allowed to accumulate between releases during a run
GOVERNOR_INTERVAL = 0.05        # seconds between two looks at the resident size
SPILL_BYTES = 2**20        # tensors at least this big are spilled (env REWRITE_SPILL_BYTES; 0 = never)
PAGE = mmap.PAGESIZE


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None
M_TRIM_THRESHOLD = -1      # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2**20     # allocations at least this big get their own mapping, returned to the system on free
TRIM_THRESHOLD = 128 * 1024            # glibc's default: free heap above this at the top goes back to the system
TRAINING_MMAP_THRESHOLD = 32 * 2**20   # glibc's largest
TRAINING_TRIM_THRESHOLD = 2**30
_heap_limited = False


def limit_heap_growth() -> None:
    """glibc raises its mmap threshold each time a big block is freed (up to 32 MiB), after which per-layer
    temporaries of that size come from the heap and stay there when freed: measured here, a merge pass over a
    300 MB model left 1.1 GB of freed-but-kept heap. Fixing the threshold keeps big blocks as their own mappings."""
    global _heap_limited
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _heap_limited = True


@contextlib.contextmanager
def reusing_heap():
    """A training loop allocates the same temporaries at every step. Under `limit_heap_growth` each one over 1 MiB
    is a fresh mapping whose pages the kernel zero-fills on first touch and unmaps on free: measured on one
    softplus-attn site of SmolLM2 (8 × 256 tokens a step), 71,500 page faults a step and as much system time as
    compute, 2.6× the step time of the same loop in a fresh process. Inside this block big temporaries come
    from the heap again and stay there between steps; afterwards the limit is restored and the free heap given
    back (malloc_trim). A no-op unless the limit is in force."""
    if not _heap_limited:
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
    _LIBC.mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)
    try:
        yield
    finally:
        _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        trim_heap()


def trim_heap() -> None:
    """Return free heap memory to the system (glibc malloc_trim)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _madvise(start: int, end: int, advice: int) -> bool:
    """madvise(advice) on the whole pages inside [start, end); True when the kernel accepted it."""
    lo = -(-start // PAGE) * PAGE
    hi = (end // PAGE) * PAGE
    if _LIBC is None or hi <= lo:
        return False
    return _LIBC.madvise(lo, hi - lo, advice) == 0


def pageout(start: int, end: int) -> bool:
    """MADV_PAGEOUT: reclaim the pages (clean file pages are evicted from the page cache too)."""
    return _madvise(start, end, MADV_PAGEOUT)


def dontneed(start: int, end: int) -> bool:
    """MADV_DONTNEED: unmap the pages (file pages stay cached; a private mapping's written pages are lost)."""
    return _madvise(start, end, MADV_DONTNEED)


def mapped_ranges(paths: set[str]) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of any of `paths` (from /proc/self/maps)."""
    if not paths:
        return []
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").removesuffix(" (deleted)") in paths:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def file_mappings(paths: set[str]) -> list[tuple[int, int, int, str, int]]:
    """(start, end, file offset, path, written bytes) of this process's mappings of any of `paths` that still exist
    on disk; written bytes: the mapping's pages that copy-on-write has made private (smaps' Anonymous)."""
    out = []
    try:
        with open("/proc/self/smaps") as f:
            current = None
            for line in f:
                parts = line.split(maxsplit=5)
                if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                    current = None
                    if len(parts) == 6 and parts[5].rstrip("\n") in paths:
                        lo, hi = parts[0].split("-")
                        current = [int(lo, 16), int(hi, 16), int(parts[2], 16), parts[5].rstrip("\n"), 0]
                        out.append(current)
                elif current is not None and parts[0] == "Anonymous:":
                    current[4] = int(parts[1]) * 1024
    except OSError:
        return []
    return [tuple(m) for m in out]


def _on_tmpfs(folder: str) -> bool:
    """Is `folder` on a memory-backed file system (tmpfs, ramfs)?"""
    try:
        best, fstype = "", ""
        real = os.path.realpath(folder)
        with open("/proc/mounts") as f:
            for line in f:
                _, mount, kind = line.split()[:3]
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, fstype = mount, kind
        return fstype in ("tmpfs", "ramfs")
    except OSError:
        return False


def scratch_dir() -> str:
    folder = os.environ.get("REWRITE_SCRATCH")
    if not folder:
        root = os.environ.get("REWRITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rewrite")
        folder = os.path.join(root, "scratch")
    os.makedirs(folder, exist_ok=True)
    return folder


@dataclass
class WeightStore:
    """The checkpoint files a program's weights are mapped from, plus the scratch files it spilled to."""

    files: list[str] = field(default_factory=list)
    spill_bytes: int = SPILL_BYTES
    scratch: str | None = None
    stats: dict = field(default_factory=lambda: {"spilled": 0, "spilled_bytes": 0, "releases": 0, "release_s": 0.0,
                                                 "spill_s": 0.0})
    _paths: set[str] = field(default_factory=set)
    _twins: list = field(default_factory=list)      # [start, end) of the frozen twins' mappings (frozen_twins)
    _readers: int = 0                               # open `reading()` phases (see there)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self._paths = {os.path.realpath(f) for f in self.files}
        env = os.environ.get("REWRITE_SPILL_BYTES")
        if env is not None:
            self.spill_bytes = int(env)
        if _LIBC is None:
            self.spill_bytes = 0
        elif self.spill_bytes and self.scratch is None:
            self.scratch = scratch_dir()
        if self.scratch is not None and _on_tmpfs(self.scratch):
            self.spill_bytes = 0   # spilling to memory would only move the bytes, not free them
        if self.active:
            limit_heap_growth()

    @property
    def active(self) -> bool:
        return _LIBC is not None and bool(self._paths)

    # ---- where bytes live
    def ranges(self) -> list[tuple[int, int]]:
        return mapped_ranges(self._paths)

    def file_backed(self, t: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> bool:
        if t.device.type != "cpu" or not t.numel():
            return False
        ptr = t.untyped_storage().data_ptr()
        return any(lo <= ptr < hi for lo, hi in (self.ranges() if ranges is None else ranges))

    # ---- giving pages back
    def release(self) -> None:
        """Reclaim the resident pages of every checkpoint and scratch mapping (see the module docstring)."""
        if not self.active:
            return
        start = time.perf_counter()
        self.release_mappings(unmap_clean=True)     # the caller's thread: nothing writes while this runs
        trim_heap()
        self.stats["releases"] += 1
        self.stats["release_s"] += time.perf_counter() - start

    def release_mappings(self, unmap_clean: bool = False) -> None:
        """Give back the resident pages of every checkpoint and scratch mapping (release without the heap trim),
        after unmapping the frozen twins' pages (drop_twin_pages: the kernel's page-out skips a page mapped twice).

        unmap_clean: a mapping no page of which was ever written (smaps Anonymous 0) is unmapped with
        MADV_DONTNEED — its pages are clean page-cache pages: they leave this process's RSS but stay cached, so
        touching them again costs a minor fault, where MADV_PAGEOUT (used otherwise, and always for a mapping
        with written pages: those stay) evicts them and the next whole-model forward reads the checkpoint from
        disk again. Measured: sampling 32 calibration sequences from TinyLlama-1.1B under the governor (128
        forwards) had not finished after 27 minutes with page-out. Unmapping is only safe while nothing can
        write to those mappings between the look at smaps and the madvise (a write in between would be dropped):
        the caller's own thread between steps (`release`), or the governor during a `reading()` phase."""
        self.drop_twin_pages()
        if not unmap_clean:
            for lo, hi in self.ranges():
                pageout(lo, hi)
            return
        for lo, hi, _, _, written in file_mappings(self._paths):
            if written:
                pageout(lo, hi)
            else:
                dontneed(lo, hi)

    @contextlib.contextmanager
    def reading(self):
        """A phase in which the model's weights are only read (calibration sampling and statistics, activations,
        verification runs): the governor may unmap clean mappings then (release_mappings(unmap_clean=True))."""
        with self._lock:
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1

    def drop_twin_pages(self) -> None:
        """MADV_DONTNEED on the frozen twins' mappings that copy-on-write has never touched (smaps Anonymous 0):
        every resident page there is a clean page-cache page, so dropping it loses nothing — the next read maps
        the file's bytes again, which is what a twin stands for (it was remapped only while equal to them). Once
        both copies of a weight have been read (heal: teacher and student forwards) each page is mapped twice, and
        MADV_PAGEOUT leaves such pages alone (measured on TinyLlama-1.1B: 257 of 4,352 MiB freed); unmapping the
        twin's side makes them the student's alone again. A twin whose mapping is gone (the teacher was freed) is
        forgotten; an address now used by anything that is not a checkpoint or scratch mapping is never touched."""
        if not self._twins:
            return
        live = []
        for lo, hi, _, _, written in file_mappings(self._paths):
            for t_lo, t_hi in self._twins:
                a, b = max(lo, t_lo), min(hi, t_hi)
                if a < b:
                    live.append((t_lo, t_hi))
                    if not written:
                        dontneed(a, b)
        self._twins = sorted(set(live))

    @contextlib.contextmanager
    def governed(self, budget: int = GOVERNOR_BUDGET, interval: float = GOVERNOR_INTERVAL):
        """While the body runs, a daemon thread releases the mappings whenever the file-backed resident size has
        grown by more than `budget` since the last release (see the module docstring)."""
        if not self.active:
            yield
            return
        stop = threading.Event()

        def watch():
            base = file_resident_bytes()
            while not stop.wait(interval):
                now = file_resident_bytes()
                if now - base > budget:
                    self.release_mappings(unmap_clean=self._readers > 0)
                    self.stats["governor_releases"] = self.stats.get("governor_releases", 0) + 1
                    base = min(base, file_resident_bytes())
        thread = threading.Thread(target=watch, name="rewrite-pager", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def release_tensor(self, t: torch.Tensor) -> None:
        """Reclaim the pages of one tensor's storage (a no-op for anonymous memory with no swap)."""
        if self.active and t.device.type == "cpu" and t.numel():
            storage = t.untyped_storage()
            pageout(storage.data_ptr(), storage.data_ptr() + storage.nbytes())

    # ---- spilling new tensors to disk
    def spill(self, module: torch.nn.Module) -> int:
        """Move every big anonymous CPU tensor of `module` (parameters and buffers) to a scratch file; returns how
        many bytes moved. The tensor objects stay the same (their `.data` is swapped)."""
        if not (self.active and self.spill_bytes):
            return 0
        with self._lock:
            start = time.perf_counter()
            ranges = self.ranges()
            moved = 0
            seen: set[int] = set()
            tensors = [t for _, t in module.named_parameters(remove_duplicate=False)] + \
                      [t for _, t in module.named_buffers(remove_duplicate=False)]
            for t in tensors:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                nbytes = t.numel() * t.element_size()
                if nbytes < self.spill_bytes or t.device.type != "cpu" or t.is_meta or t.is_sparse:
                    continue
                storage = t.untyped_storage()
                if storage.nbytes() != nbytes or not t.is_contiguous() or t.storage_offset():
                    continue        # a view of something bigger: the owner decides
                if self.file_backed(t, ranges):
                    continue
                mapped = self._write_and_map(t.detach())
                with torch.no_grad():
                    t.data = mapped
                moved += nbytes
                self.stats["spilled"] += 1
            self.stats["spilled_bytes"] += moved
            self.stats["spill_s"] += time.perf_counter() - start
            return moved

    def spill_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A file-backed copy of `t` (same dtype, shape, bytes) when it is a big contiguous anonymous CPU tensor,
        else `t` itself. For results a pass holds before they enter the program: calibrated `monarch` keeps every
        layer's factors until the last chunk of layers is fitted (so that each chunk's statistics see the program
        it received), which on TinyLlama-1.1B is ~0.7 GB of anonymous memory if they stay in RAM."""
        nbytes = t.numel() * t.element_size()
        if not (self.active and self.spill_bytes) or nbytes < self.spill_bytes or t.device.type != "cpu" \
                or t.requires_grad or not t.is_contiguous() or t.is_sparse or t.untyped_storage().nbytes() != nbytes:
            return t
        with self._lock:
            if self.file_backed(t):
                return t
            start = time.perf_counter()
            mapped = self._write_and_map(t)
            self.stats["spilled"] += 1
            self.stats["spilled_bytes"] += nbytes
            self.stats["spill_s"] += time.perf_counter() - start
        return mapped

    def _write_and_map(self, t: torch.Tensor) -> torch.Tensor:
        fd, path = tempfile.mkstemp(prefix="spill-", suffix=".bin", dir=self.scratch)
        try:
            raw = t.reshape(-1).view(torch.uint8).numpy()
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(memoryview(raw))
            size = raw.nbytes
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
            os.unlink(path)          # the mapping keeps the blocks; nothing is left behind on exit
        self._paths.add(os.path.realpath(path))
        mapped = torch.frombuffer(mapping, dtype=torch.uint8, count=size).view(t.dtype).view(t.shape)
        return mapped

    # ---- a read-only copy that costs no memory (the teacher of a distillation pass)
    def frozen_twins(self, module: torch.nn.Module) -> dict[int, torch.Tensor]:
        """For copy.deepcopy's memo: id(tensor) → a frozen twin costing no memory, for every big CPU tensor of
        `module`. A tensor still equal to the checkpoint bytes it is a view of gets a second private mapping of
        those bytes (nothing read until used, and then the page cache's pages, shared with the original); any other
        is copied into a scratch file. Writes to either copy stay private to it (copy-on-write)."""
        twins: dict[int, torch.Tensor] = {}
        if not self.active:
            return twins
        maps = file_mappings(self._paths)
        tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
        for t in tensors.values():
            if t.device.type != "cpu" or t.is_sparse or t.numel() * t.element_size() < max(self.spill_bytes, PAGE):
                continue
            twin = self._remap(t.detach(), maps)
            if twin is None:
                twin = self.spill_tensor(t.detach().clone())
                trim_heap()
            twins[id(t)] = torch.nn.Parameter(twin, requires_grad=False) if isinstance(t, torch.nn.Parameter) \
                else twin
        return twins

    def _remap(self, t: torch.Tensor, maps) -> torch.Tensor | None:
        """A new private mapping of the checkpoint bytes `t` is a view of, as a tensor of t's layout; None when t
        is not such a view or no longer equals those bytes (written in place since it was loaded)."""
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        where = next(((lo, off, path, written) for lo, hi, off, path, written in maps
                      if lo <= ptr and ptr + nbytes <= hi), None)
        if where is None:
            return None
        lo, off, path, written = where
        start = off + (ptr - lo)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), nbytes + start - aligned, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start - aligned)

        twin = torch.empty(0, dtype=t.dtype, device="cpu").set_(raw.untyped_storage(), t.storage_offset(), t.shape,
                                                                t.stride())
        if written and not torch.equal(twin, t):   # (an unwritten mapping holds the file's bytes: nothing to read)
            return None
        base = raw.data_ptr() - (start - aligned)
        self._twins.append((base, base + len(mapping)))
        return twin

    def tidy(self, module: torch.nn.Module | None = None) -> None:
        """Between layers: spill new big tensors, then give pages back."""
        if not self.active:
            return
        if module is not None:
            self.spill(module)
        self.release()


def reading(store: "WeightStore | None"):
    """store.reading(), or nothing to do without a store (a model held in memory)."""
    return store.reading() if store is not None else contextlib.nullcontext()


def store_for(model) -> WeightStore | None:
    """The store of a model loaded by rewriter.hf (it lists its checkpoint shards), else None."""
    files = getattr(model, "checkpoint", None)
    if not files:
        return None
    store = WeightStore(list(files))
    return store if store.active else None


def file_resident_bytes() -> int:
    """This process's file-backed resident memory (RssFile in /proc/self/status, bytes); 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes() -> int:
    """This process's resident set size (bytes), from /proc; 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0
