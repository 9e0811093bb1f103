"""Distillation: train a rewritten program to reproduce the program it came from (the machinery behind `heal`).

Losses, per position (mean over positions and batch):
    language model   KL(p_teacher ‖ p_student) of the next-token distributions, temperature 1 — the quantity
                     whose exponential-average gap *is* the perplexity gap on the teacher's own text
    anything else    normalised MSE ‖y_s − y_t‖² / mean ‖y_t‖² (for embeddings: a cosine of 1 − MSE/2 on unit rows)

The loop (`train`) is a plain function of two forward functions, a parameter list and a batch iterator, so a
DistributedDataParallel wrapper can drive it unchanged: AdamW (weight decay 0, β = (0.9, 0.99)), learning rate
with a linear warm-up over the first 10 % of the steps then cosine decay to 0, gradient accumulation over `accum`
micro-batches, the global gradient norm clipped at 1. Deterministic: no dropout, batches in a fixed order.

Layer statistics for the layer-wise stage (`capture_pairs`): each rewritten layer reads x_s in the student and the
layer it replaced read x_t in the teacher, on the same calibration batch; the stage needs only the Grams
    H_ss = X_sᵀX_s / rows,   H_ts = X_tᵀX_s / rows   (and H_tt = X_tᵀX_t / rows for the loss value)
because  ‖X_t·Wᵀ − X_s·Ŵᵀ‖² / rows = tr(Ŵ·H_ss·Ŵᵀ) − 2·tr(Ŵ·H_tsᵀ·Wᵀ) + tr(W·H_tt·Wᵀ)
        = ‖(Ŵ − W̃)·L_s‖²_F + const,   W̃ = W·H_ts·H_ss⁻¹,  H_ss = L_s·L_sᵀ
— so the best layer given the rewritten upstream is the calibrated projection (rewriter/weighted.py,
rewriter/bcq_fit.py) of the *corrected target* W̃ (the least-squares map from the student's inputs to the teacher's
outputs) under H_ss: closed forms, no gradient steps, O(n³) per layer.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx

from .calibration import run_flat


# ---- losses ----------------------------------------------------------------------------------------------------
def kl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) ‖ softmax(student)) along the last dim (float32 inside)."""
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]), -1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖y_s − y_t‖² / ‖y_t‖² (the normalised mean squared error), float32."""
    t = teacher.float()
    return (student.float() - t).square().sum() / t.square().sum().clamp_min(1e-30)


LOSSES = {"kl": kl_loss, "mse": mse_loss}


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.1) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return lr * (step + 1) / w
    progress = (step - w) / max(1, steps - w)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- the loop ---------------------------------------------------------------------------------------------------
class NoGradient(Exception):
    """The loss does not depend on any trained parameter (the output is computed without them)."""


def train(forward: Callable, teacher_forward: Callable, params: list[torch.Tensor], batches: Iterable[list], *,
          steps: int, lr: float, accum: int = 1, loss: str = "kl", clip: float = 1.0,
          progress: Callable | None = None, status: dict | None = None,
          average: Callable[[float], float] | None = None, lr_scales: list[float] | None = None,
          cache_bytes: int = 0) -> list[float]:
    """Minimise LOSSES[loss](forward(b), teacher_forward(b)) over `params` for `steps` optimizer steps of `accum`
    micro-batches each (taken from `batches`, cycled). Returns the loss of every step. `progress(iterable)`
    wraps the step loop (a progress bar); `status` (a dict) is updated with the running figures. Data-parallel:
    `forward` runs through a DDP wrapper (which averages the gradients across the ranks), `batches` is this rank's
    shard and `average` (the mean over the ranks) turns each step's local loss into the global one.
    `lr_scales` (one per tensor of `params`, default 1): that tensor's learning rate is lr·scale throughout the
    schedule — Adam moves every element by about the learning rate whatever its gradient's size, so a tensor
    much smaller than the weights it stands for (a quantization grid's step) needs a proportionally smaller one.
    `cache_bytes`: the teacher's outputs are kept (where they were computed) for as many batches as fit, so a batch
    seen again costs only the student's forward and backward — the batches cycle, and heal's defaults visit each
    one ~7 times (MiniLM, shiftadd 3 bits, 60 steps on this CPU: the teacher's forward took 30 s of 158 s in 60
    calls, 7.4 s of 135 s in 15 with the cache). The same values as recomputing them; 0 (the default here)
    recomputes every time — what a teacher that runs collectives (FSDP) needs, since every rank must run it the
    same number of times."""
    loss_fn = LOSSES[loss]
    scales = lr_scales or [1.0] * len(params)
    if len(scales) != len(params):
        raise ValueError(f"{len(scales)} lr_scales for {len(params)} tensors")
    by_scale: dict[float, list] = {}
    for p, scale in zip(params, scales):
        by_scale.setdefault(float(scale), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr_scale": scale} for scale, ps in by_scale.items()], lr=lr,
                            betas=(0.9, 0.99), weight_decay=0.0)
    source = _cycle(batches)
    targets: dict[int, torch.Tensor] = {}
    cached = 0
    history: list[float] = []
    running = None
    steps_iter = range(steps) if progress is None else progress(range(steps))
    for step in steps_iter:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr) * group["lr_scale"]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            index, batch = next(source)
            target = targets.get(index)
            if target is None:
                with torch.no_grad():
                    target = teacher_forward(batch)
                size = target.numel() * target.element_size()
                if cached + size <= cache_bytes:
                    targets[index] = target
                    cached += size
            value = loss_fn(forward(batch), target) / accum
            if not value.requires_grad:
                raise NoGradient("the output the loss is taken on does not depend on the trained parameters")
            value.backward()
            total += float(value.detach())
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        with torch.device("cpu"):   # AdamW keeps its step counts on the default device: the CPU, as torch intends
            opt.step()              # (a caller's default device — CUDA or meta — would split its foreach groups)
        if average is not None:
            total = average(total)
        history.append(total)
        running = total if running is None else 0.9 * running + 0.1 * total
        if status is not None:
            status.update(step=step + 1, loss=total, running=running)
    opt.zero_grad(set_to_none=True)
    return history


def _cycle(batches):
    items = list(batches)
    if not items:
        raise ValueError("no training batches")
    while True:
        yield from enumerate(items)


def evaluate(forward: Callable, teacher_forward: Callable, batches: list, loss: str) -> float:
    """Mean loss over `batches` (no gradients)."""
    loss_fn = LOSSES[loss]
    with torch.no_grad():
        values = [float(loss_fn(forward(b), teacher_forward(b))) for b in batches]
    return sum(values) / max(1, len(values))


def forward_of(gm: fx.GraphModule, call=None) -> Callable:
    """flat inputs -> the program's first output (through `call`, a wrapper of gm such as DDP, when given)."""
    return lambda flat: run_flat(gm, flat, call)


# ---- layer statistics ----------------------------------------------------------------------------------------------
def _capture(gm: fx.GraphModule, flat: list, nodes: set) -> dict:
    got = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in nodes:
                got[n] = value.detach().reshape(-1, value.shape[-1]).float()
            return value

    with torch.no_grad():
        Capture(gm).run(*flat)
    return got


def capture_pairs(teacher: fx.GraphModule, student: fx.GraphModule, pairs: list[tuple[fx.Node, fx.Node]],
                  batches: list, progress: Callable | None = None) -> dict:
    """(teacher input node, student input node) -> {"ss": H_ss, "ts": H_ts, "tt": H_tt, "rows": rows}."""
    t_nodes = {t for t, _ in pairs}
    s_nodes = {s for _, s in pairs}
    out: dict = {}
    for flat in (batches if progress is None else progress(batches)):
        xt = _capture(teacher, flat, t_nodes)
        xs = _capture(student, flat, s_nodes)
        for t, s in set(pairs):
            if t not in xt or s not in xs or xt[t].shape != xs[s].shape:
                continue
            a, b = xt[t], xs[s]
            acc = out.setdefault((t, s), {"ss": 0, "ts": 0, "tt": 0, "rows": 0})
            acc["ss"] = acc["ss"] + b.t() @ b
            acc["ts"] = acc["ts"] + a.t() @ b
            acc["tt"] = acc["tt"] + a.t() @ a
            acc["rows"] += a.shape[0]
    for acc in out.values():
        rows = max(1, acc["rows"])
        for key in ("ss", "ts", "tt"):
            acc[key] = acc[key] / rows
    return out


def corrected_target(w: torch.Tensor, h_ts: torch.Tensor, h_ss: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """W̃ = W·H_ts·(H_ss + λI)⁻¹ in float64: the least-squares map from the student's inputs to the teacher's
    outputs (λ = damp · mean diag H_ss)."""
    from .weighted import damped
    hs = damped(h_ss, None, damp)
    return torch.linalg.solve(hs, (w.double() @ h_ts.double()).t()).t()


def layer_loss(w: torch.Tensor, approx: torch.Tensor, grams: dict) -> float:
    """‖X_t·Wᵀ − X_s·Ŵᵀ‖² / ‖X_t·Wᵀ‖² from the Grams (float64)."""
    wd, ad = w.double(), approx.double()
    tt = float(((wd @ grams["tt"].double()) * wd).sum())
    cross = float(((ad @ grams["ts"].double().t()) * wd).sum())
    ss = float(((ad @ grams["ss"].double()) * ad).sum())
    return max(ss - 2 * cross + tt, 0.0) / max(tt, 1e-300)
