"""Data-parallel helpers for `heal` under `torchrun` — PyTorch's own engine (torch.distributed + DDP), nothing else.

    torchrun --nproc_per_node 2 -m rewriter.cli MODEL --pass "monarch{blocks=4},heal" -o out.pt2

A run is distributed when torch.distributed is already initialised or the launcher's environment says WORLD_SIZE > 1
(torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `setup` then initialises the default process
group (gloo on the CPU, nccl for a model on CUDA). Outside that every helper is the identity: one process behaves
exactly as without this module.

What `heal` does with them: the calibration batches are drawn on rank 0 and broadcast (`broadcast_batches`), rank r
trains on micro-batches r, r+W, r+2W, … of the single process's cycled sequence (`shard`), DDP averages the
gradients (`wrap`), every keep/undo decision is taken on rank 0's held-out loss (`from_main`), tensors computed on
rank 0 alone are broadcast (`broadcast_tensors`), and only rank 0 prints and writes (`is_main`). With
`heal{shard=true}` FSDP takes DDP's place (rewriter/fsdp.py); everything else here stays the same.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched() -> bool:
    """True under a multi-process launcher (WORLD_SIZE > 1) or when a process group already exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | str = "cpu") -> int:
    """Initialise the default process group if launched and not done yet (nccl for CUDA, else gloo); returns the
    world size (1 when not launched: nothing is initialised)."""
    if not launched():
        return 1
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return dist.get_world_size()


def close() -> None:
    """Destroy the default process group if one exists (the end of a CLI run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank: the process group's, else the launcher's RANK when WORLD_SIZE > 1, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world() -> int:
    """The number of processes training together (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main() -> bool:
    """Rank 0 (the only one that prints and writes files); True in a single process."""
    return rank() == 0


def active() -> bool:
    """A process group of more than one process exists (the helpers below communicate only then)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---- data ----------------------------------------------------------------------------------------------------------
def shard(batches: list, accum: int) -> tuple[list, int]:
    """(this rank's micro-batches, micro-batches per optimizer step on this rank).

    The single process takes micro-batches 0, 1, 2, … of `batches` cycled, `accum` per step. Rank r of W takes
    global positions r, r+W, r+2W, … of that same cycled sequence: over one period of lcm(len, W) positions that
    is a list of lcm/W batches (references, no copies), which cycling repeats exactly. Each rank takes
    ceil(accum/W) per step, so a step covers W·ceil(accum/W) consecutive global positions: exactly the single
    process's step when W divides `accum`, else a larger global batch (as if accum were W·ceil(accum/W))."""
    w, r = world(), rank()
    if w == 1:
        return list(batches), accum
    n = len(batches)
    if n == 0:
        return [], -(-accum // w)
    period = n * w // math.gcd(n, w)
    return [batches[(r + w * m) % n] for m in range(period // w)], -(-accum // w)


def broadcast_batches(batches: list | None, device: torch.device | str) -> list:
    """Rank 0's list of flat input lists on every rank (tensors travel through the CPU, land on `device`)."""
    if not active():
        return batches
    cpu = [[t.cpu() if isinstance(t, torch.Tensor) else t for t in flat] for flat in batches] if is_main() else None
    box = [cpu]
    dist.broadcast_object_list(box, src=0)
    if is_main():
        return batches
    return [[t.to(device) if isinstance(t, torch.Tensor) else t for t in flat] for flat in box[0]]


# ---- values and tensors ---------------------------------------------------------------------------------------------
def from_main(value: float) -> float:
    """Rank 0's `value` on every rank (a loss that decides keep / undo: every rank must decide alike)."""
    if not active():
        return value
    box = [float(value) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wire() -> torch.device:
    """Where tensors must be to travel through the process group: this rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean(value: float) -> float:
    """The mean of `value` over the ranks (a training loss for the report)."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=wire())
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


def broadcast_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors holding rank 0's values (same shapes and dtypes; the given ones are not written to: they may be
    views of read-only weight files). They travel through `wire()`."""
    if not active():
        return tensors
    out = []
    for t in tensors:
        buf = t.detach().clone() if is_main() else torch.empty_like(t)
        travel = buf.to(wire())             # gloo: the CPU; nccl: this rank's GPU (a CPU program's tensor too)
        dist.broadcast(travel, src=0)
        out.append(travel.to(t.device) if travel is not buf else buf)
    return out


def checksum(tensors: list[torch.Tensor]) -> tuple[float, float]:
    """(min, max) over the ranks of a float64 checksum of `tensors` (position-weighted): equal ⇔ (up to
    collisions) every rank holds the same values. One process: (its checksum, its checksum)."""
    total = 0.0
    for t in tensors:
        flat = t.detach().double().flatten()
        weights = torch.arange(flat.numel(), dtype=torch.float64).remainder(7919).add(1)    # order matters too
        total += float((flat * weights).sum())
    if not active():
        return total, total
    low, high = (torch.tensor([total], dtype=torch.float64, device=wire()) for _ in range(2))
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return float(low[0]), float(high[0])


# ---- gradients ------------------------------------------------------------------------------------------------------
def wrap(module: torch.nn.Module, device: torch.device | str = "cpu"):
    """`module` inside DistributedDataParallel (its forward averages the gradients of the parameters that require
    grad across the ranks during backward), or `module` itself in a single process. No initial broadcast
    (init_sync=False): `heal` makes the parameters identical itself and checks it. static_graph: the program is
    the same every step, and a trained parameter the loss does not reach (train=all: a tensor the graph holds but
    no longer reads) is found once, in the first step, instead of failing the reduction."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return DistributedDataParallel(module, device_ids=ids, init_sync=False,
                                   forward_sync_buffers=False, static_graph=True)
