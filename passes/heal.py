"""`heal` — distil the rewritten program from the program as it was before the pipeline (the teacher).

    rewrite smollm2 --pass "monarch{blocks=4},heal{steps=300}"
    rewriter.rewrite(model, args, passes="shiftadd{bits=3},heal")

Data: `samples` sequences of `seq` tokens from `data` (default: sampled from the teacher itself, temperature 1 —
rewriter/calibration.py), micro-batches of `batch` sequences (a program captured with static shapes takes its own
batch shape), the last `holdout` batches held out to measure the loss before and after. A text encoder reads
windows of a text as long as its example inputs, `samples`·`seq` tokens of them, `batch`·`seq` tokens a micro-batch
(rewriter/calibration.py): MiniLM, whose evaluation sentences are 14 tokens, lost cosine when healed on 128-token
windows (shiftadd 3 bits: 0.969 → 0.959) and gains on windows like its inputs (0.976 → 0.9796).

mode=layer (closed forms, rewriter/distill.py) — each rewritten layer (monarch, blockdiag, lowrank, shiftadd) is
    refitted to what it must produce given what the rewritten layers before it now feed it: with the Grams of its
    student input X_s and its teacher input X_t on the calibration data, the best layer is the calibrated
    projection, under H_ss, of the corrected target W̃ = W·H_ts·H_ss⁻¹ (the least-squares map from the student's
    inputs to the teacher's outputs). A refit is kept only where it lowers the layer's loss
    ‖X_t·Wᵀ − X_s·Ŵᵀ‖²/‖X_t·Wᵀ‖², and the stage only where it lowers the held-out loss. The Grams (three per
    input) are captured for as many consecutive layers as fit the Gram budget ($REWRITE_GRAM_BYTES, 400 MiB), those
    are refitted, then the next layers' inputs are captured through the refitted ones.
mode=e2e — AdamW on the whole program's output: KL(p_teacher ‖ p_student) per position for a language model,
    normalised MSE otherwise (rewriter/distill.py: warm-up + cosine learning rate, `accum` micro-batches per
    step, gradient clipping). What trains (train=auto): the parameters the pipeline created (factors, codebooks)
    and the shift-add scales (straight-through power-of-two snapping, rewriter/trainable.py; the affine code's
    scales and offsets at lr·2^(1−q), q bit planes: they are a grid step, not a weight); with nothing of that
    kind but softplus-attn's per-head gains and biases (2 numbers a head), LoRA branches of rank `rank` on the
    linear layers as well. train=new: only the first
    group; lora: LoRA branches; all: every floating-point parameter. adapters=true also puts LoRA branches beside
    shift-add layers (kept in the program: binary weights cannot absorb them). vectors=true also trains the
    program's own 1-D parameters — normalisation scales and shifts, biases (norm tweaking): a few thousand numbers
    per layer, stored as they are.
mode=auto (default) — the layer stage for the layers their pass fitted without calibration data (calibrate=0, or a
    program rewritten elsewhere), then e2e. A layer its pass already fitted to calibration data (the default of
    every projection) got the same closed form from the original model's inputs; refitting it to the student's
    inputs on heal's samples did not lower the held-out loss in any SmolLM2 run (shiftadd 3 and 4 bits, structured:
    undone every time) and cost 83–733 s there. mode=both: layer (every rewritten layer), then e2e.
Afterwards the discrete parts are re-derived so the program keeps its compact form: shift-add exponents from the
trained scales, LoRA branches of dense layers merged into their weights (float64, rounded once), pre-merged
products recomputed, and each vq code map re-derived (every token to the trained code nearest its teacher row),
kept where that lowers the held-out loss. If the held-out loss ended higher than it started, every change is
undone. When the training loss ends under half the held-out loss after each training batch was seen more than
once, heal says the samples are overfit (figure `overfit`): more samples or data=FILE generalise better.

Data-parallel (rewriter/distributed.py) — under `torchrun --nproc_per_node W -m rewriter.cli MODEL --pass "…,heal"`
    (WORLD_SIZE > 1, or a process group already initialised) heal opens the default process group (gloo on the
    CPU, nccl for a model on CUDA) and trains through PyTorch's DistributedDataParallel around the program: the
    calibration batches are drawn on rank 0 and broadcast; the layer stage runs on rank 0 and its tensors are
    broadcast; rank r trains on positions r, r+W, r+2W, … of the single process's cycled micro-batch sequence,
    ceil(accum/W) per step, with the gradients averaged by DDP — so when W divides `accum` every step sees the same
    micro-batches and the same mean gradient as one process (up to the order of the floating-point sums; with
    W = accum = 2 bit for bit), otherwise the global batch is W·ceil(accum/W) micro-batches. Every keep / undo
    decision uses rank 0's held-out loss (broadcast), the trained tensors are checked identical on every rank
    (an all-reduced checksum), and only rank 0 prints and writes. Tested with gloo on the CPU (2 processes);
    nccl is written but untested. One process: exactly as before.
    shard=true — FSDP instead of DDP (PyTorch's `fully_shard`, rewriter/fsdp.py) for a model whose training does
    not fit one device: the student and the teacher are trained / run through copies cut into `units` pieces of
    about equal bytes, each rank holding 1/W of every tensor, of its gradient and of AdamW's states, and
    gathering one piece's weights at a time; the trained values are gathered back into the program afterwards.
    With GPUs present the process group is nccl and the shards live on the GPUs even when the program itself
    stays in host memory. The same micro-batches and gradient average as DDP: with gloo and 2 ranks the result
    equals one process's bit for bit (tested). The layer stage and the held-out losses still run on rank 0's
    full program.

Contract: approximate (the function moves towards the teacher's; the measured error is reported). Reported:
held-out loss before / after the layer stage / after training, per-layer losses, steps, time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from rewriter import calibration, distill, distributed, fsdp, params, trainable
from rewriter.errors import InternalError, UserError
from rewriter.ir import get_attr_value, provenance
from rewriter.matchers.linear import find_linears, is_lm_head
from rewriter.pass_base import Contract, Pass


def _pair_chunks(plans: list, budget: int) -> list[list]:
    """(layer, teacher site) plans cut into consecutive chunks whose teacher/student Grams (H_ss, H_ts, H_tt: three
    fp32 in×in matrices per distinct input) fit `budget` bytes; a layer bigger than the budget gets a chunk alone."""
    chunks, chunk, inputs, used = [], [], set(), 0
    for layer, site in plans:
        key = (site.x, layer.node.args[0])
        cost = 0 if key in inputs else 3 * 4 * site.in_features ** 2
        if chunk and used + cost > budget:
            chunks.append(chunk)
            chunk, inputs, used = [], set(), 0
            cost = 3 * 4 * site.in_features ** 2
        chunk.append((layer, site))
        inputs.add(key)
        used += cost
    return chunks + [chunk] if chunk else chunks


def refit_layer(target, w_teacher, grams, cfg, dtype_name, current):
    """One layer's closed-form refit (runs in ctx.map_layers): (new tensors or None, loss before, loss after)."""
    before = distill.layer_loss(w_teacher, current, grams)
    tensors = trainable.reproject(target, grams["ss"], cfg, dtype_name)
    out_f, in_f = w_teacher.shape
    after = distill.layer_loss(w_teacher, trainable.dense_of(tensors, None, cfg, in_f, out_f), grams)
    return (tensors, before, after) if after < before else (None, before, before)


@dataclass(frozen=True)
class HealPass(Pass):
    name = "heal"
    contract = Contract.APPROXIMATE
    needs_teacher = True
    summary = "distil the rewritten program from the original: closed-form layer refits, then end-to-end KL"
    fuzz_options = {"steps": 2, "samples": 4, "seq": 8, "batch": 2}

    steps: int = 100
    lr: float = 2e-4
    mode: Literal["auto", "layer", "e2e", "both"] = "auto"
    data: str = "self"
    samples: int = 64
    seq: int = calibration.DEFAULT_SEQ
    batch: int = 4
    accum: int = 1
    holdout: int = 1
    seed: int = 0
    train: Literal["auto", "new", "lora", "all"] = "auto"
    rank: int = 8
    adapters: bool = False
    vectors: bool = False
    shard: bool = False
    units: int = 8

    def __post_init__(self):
        if self.steps < 0 or self.samples < 1 or self.batch < 1 or self.accum < 1 or self.holdout < 0:
            raise ValueError("steps >= 0, samples >= 1, batch >= 1, accum >= 1 and holdout >= 0 are required")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.units < 1:
            raise ValueError(f"units must be >= 1, got {self.units}")
        calibration.check_options(self.data, self.samples, self.seq, "samples")

    def should_run(self, ctx):
        out = _first_output(ctx.gm)
        if out is None or not out.is_floating_point():
            return "the program's first output is not a floating-point tensor: nothing to distil"
        if not trainable.find_layers(ctx.gm) and self.train in ("auto", "new") and not find_linears(ctx.gm):
            return "nothing to train: no rewritten layer and no linear layer for LoRA"
        return None

    def run(self, ctx) -> None:
        start = time.perf_counter()
        gm, teacher = ctx.gm, ctx.teacher
        if teacher is None:
            raise UserError("heal needs the program as it was before the pipeline (run it through rewrite())")
        io = calibration.describe(ctx)
        loss = "kl" if io.lm else "mse"
        device = _device(gm)
        figures = {"loss": loss}
        # 1 (and nothing initialised) outside torchrun; shard=true trains on the GPUs when there are some, wherever
        # the program lives (a model too big for one GPU stays in host memory: only its shards go to the GPUs)
        ranks = distributed.setup("cuda" if self.shard and torch.cuda.is_available() else device)
        if ranks > 1:
            figures["ranks"] = ranks
        spec = calibration.DataSpec(self.data, self.samples, self.seq, self.seed)
        data = distributed.broadcast_batches(
            calibration.batches(ctx, spec, rows=self.batch) if distributed.is_main() else None, device)
        held = data[len(data) - self.holdout:] if 0 < self.holdout < len(data) else data[-1:]
        train_batches = data[: len(data) - len(held)] or data
        student_fwd, teacher_fwd = distill.forward_of(gm), distill.forward_of(teacher)
        figures["loss_before"] = _held_loss(student_fwd, teacher_fwd, held, loss)
        snapshot = _snapshot(gm)
        layers = trainable.find_layers(gm)
        figures["data_seconds"] = round(time.perf_counter() - start, 1)
        if self.mode == "auto":
            layers, calibrated = _split_calibrated(layers)
            if calibrated:
                figures["layers_fitted_by_their_pass"] = len(calibrated)
                ctx.message(f"heal: {len(calibrated)} layers were fitted to calibration data by their pass: no layer "
                            f"refit for them (mode=both refits them too)")
        if self.mode in ("auto", "layer", "both") and layers:
            t0 = time.perf_counter()
            if distributed.is_main():                    # closed forms: rank 0 computes, the others receive
                self._layer_stage(ctx, layers, train_batches, figures)
            _sync_layers(gm, layers)
            figures["layer_seconds"] = round(time.perf_counter() - t0, 1)
            figures["loss_after_layer"] = _held_loss(student_fwd, teacher_fwd, held, loss)
            if not figures["loss_after_layer"] <= figures["loss_before"]:     # (NaN counts as worse)
                _restore(gm, snapshot)
                ctx.message("heal: the layer refits raised the held-out loss; undone")
                figures["loss_after_layer"] = figures["loss_before"]
            snapshot = _snapshot(gm)
        kept = []
        if self.mode != "layer" and self.steps:
            t0 = time.perf_counter()
            with torch.enable_grad():   # also when the caller runs the pipeline under no_grad (torch.compile)
                kept = self._e2e_stage(ctx, trainable.find_layers(gm), train_batches, loss, figures)
            figures["e2e_seconds"] = round(time.perf_counter() - t0, 1)
        if self.mode != "layer" and self.steps:
            self._rederive_maps(ctx, held, loss, figures)
        figures["loss_after"] = _held_loss(student_fwd, teacher_fwd, held, loss)
        start_loss = figures.get("loss_after_layer", figures["loss_before"])
        if not figures["loss_after"] <= start_loss:     # worse, or NaN / inf (a diverged low-precision run)
            for _, u_name, v_name, add, _, _ in kept:
                trainable.drop_branch(gm, u_name, v_name, add)
            _restore(gm, snapshot)
            figures["loss_after"] = start_loss
            ctx.message("heal: training raised the held-out loss; its changes are undone")
        figures["seconds"] = round(time.perf_counter() - start, 1)
        stages = " → ".join(f"{figures[k]:.4g}" for k in ("loss_before", "loss_after_layer", "loss_after")
                            if k in figures)
        ctx.message(f"heal: held-out {'KL (nats/token)' if loss == 'kl' else 'normalised MSE'} {stages} "
                    f"({len(train_batches)} training batches, {self.steps if self.mode != 'layer' else 0} steps, "
                    f"{figures['seconds']:.0f} s)")
        hint = overfit_hint(figures.get("train_loss_end"), figures["loss_after"], len(train_batches),
                            self.steps * self.accum if self.mode != "layer" else 0)
        if hint:
            figures["overfit"] = True
            ctx.message(hint)
        ctx.site("program", "rewritten", **figures)

    # ---- stage 1: closed-form layer refits ------------------------------------------------------------------------
    def _layer_stage(self, ctx, layers, batches, figures) -> None:
        t_sites = find_linears(ctx.teacher)
        plans = []
        for layer in layers:
            if layer.kind == "vq":
                continue
            site = trainable.teacher_site(t_sites, layer.some_tensor)
            if site is None:
                ctx.skip(layer.some_tensor, "heal: no teacher layer found for it")
                continue
            plans.append((layer, site))
        if not plans:
            return
        improved = 0
        for chunk in _pair_chunks(plans, calibration.gram_budget()):
            improved += self._refit_chunk(ctx, chunk, batches)
        figures["layers_refitted"] = improved

    def _refit_chunk(self, ctx, plans, batches) -> int:
        """Capture the teacher/student Grams of these layers' inputs, refit them, store what improved. Chunks run in
        order, so a later chunk's student inputs come from the layers refitted before it (a sequential refit; the
        corrected target W·H_ts·H_ss⁻¹ is fitted to exactly those inputs)."""
        gm, teacher = ctx.gm, ctx.teacher
        grams = distill.capture_pairs(teacher, gm, [(s.x, layer.node.args[0]) for layer, s in plans], batches,
                                      lambda items: ctx.progress(items, "capturing teacher/student layer inputs"))
        items, kept = [], []
        for layer, site in plans:
            g = grams.get((site.x, layer.node.args[0]))
            if g is None:
                ctx.skip(layer.some_tensor, "heal: the teacher and student inputs of this layer differ in shape")
                continue
            w_t = site.weight_out_in(teacher).detach().double()
            target = distill.corrected_target(w_t, g["ts"], g["ss"])
            dtype = params_dtype(gm, layer)
            items.append((target, w_t, g, trainable.config(gm, layer), str(dtype).replace("torch.", ""),
                          trainable.dense_weight(gm, layer)))
            kept.append((layer, site))
        del grams
        results = ctx.map_layers(refit_layer, items, "refitting layers")
        del items
        improved = 0
        for (layer, site), (tensors, before, after) in zip(kept, results):
            if tensors is not None:
                trainable.store(gm, layer, tensors)
                improved += 1
            ctx.site(site.name, "rewritten", stage="layer", kind=layer.kind, layer_loss_before=before,
                     layer_loss_after=after)
        return improved

    # ---- stage 2: end to end -------------------------------------------------------------------------------------
    def _e2e_stage(self, ctx, layers, batches, loss, figures) -> None:
        gm = ctx.gm
        teacher_names = set(dict(ctx.teacher.named_parameters()))
        opened, branches, trained = [], [], []
        lr_scale: dict[str, float] = {}            # tensor name -> its learning rate's scale (default 1)
        if self.train in ("auto", "new"):
            for layer in layers:
                if layer.kind == "shiftadd":
                    names = trainable.open_shiftadd(gm, layer)
                    lr_scale.update(dict.fromkeys(names, trainable.shiftadd_lr_scale(gm, layer)))
                    trained += names
                    opened.append(layer)
            trained += [name for name, p in gm.named_parameters()
                        if name not in teacher_names and p.is_floating_point() and name not in trained]
        if self.train == "all":
            trained = [name for name, p in gm.named_parameters() if p.is_floating_point()]
        lora_sites = []
        head = trainable.attention_head_tensors(gm)          # softplus-attn's per-head gains and biases: too few
        if self.train == "lora" or (self.train == "auto" and all(name in head for name in trained)):
            lora_sites = [s for s in find_linears(gm) if not is_lm_head(gm, s)]
        if self.adapters:
            lora_sites += [("shiftadd", layer) for layer in layers if layer.kind == "shiftadd"]
        for i, site in enumerate(lora_sites):
            branches.append(self._branch(gm, site, i))
            trained += [branches[-1][1], branches[-1][2]]
        if self.vectors and self.train != "all":
            trained += [name for name, p in gm.named_parameters()
                        if p.dim() == 1 and p.is_floating_point() and name in teacher_names and name not in trained]
        if not trained:
            ctx.message("heal: nothing to train end to end")
            return []
        _own(gm, trained)
        named = dict(gm.named_parameters())
        flags = {name: p.requires_grad for name, p in named.items()}
        for name, p in named.items():
            p.requires_grad_(name in trained)
        kept_names = [name for name in dict.fromkeys(trained) if name in named]
        tensors = [named[name] for name in kept_names]
        status: dict = {}
        label = "KL" if loss == "kl" else "MSE"
        history: list[float] = []
        local, accum = distributed.shard(batches, self.accum)      # one process: all of them, self.accum
        if self.shard and not distributed.active():
            ctx.message("heal: shard=true shards over the processes of a torchrun launch; one process trains "
                        "unsharded")
        student = sharded = teacher_sharded = train_tensors = None
        try:
            if self.shard and distributed.active():                # FSDP: training copies in units, sharded
                sharded = fsdp.shard_program(gm, self.units)
                teacher_sharded = fsdp.shard_program(ctx.teacher, self.units)
                student, teacher_call = sharded, teacher_sharded
                train_tensors = [sharded.tensors[name] for name in kept_names if name in sharded.tensors]
                train_scales = [lr_scale.get(name, 1.0) for name in kept_names if name in sharded.tensors]
                figures.update(shard_units=sharded.units, shard_fraction=round(sharded.local_fraction(), 4))
            else:
                student, teacher_call = distributed.wrap(gm, _device(gm)), None     # one process: gm itself
                train_tensors, train_scales = tensors, [lr_scale.get(name, 1.0) for name in kept_names]
            history = distill.train(
                distill.forward_of(gm, student), distill.forward_of(ctx.teacher, teacher_call), train_tensors, local,
                steps=self.steps, lr=self.lr, accum=accum, loss=loss, status=status, average=distributed.mean,
                lr_scales=train_scales, cache_bytes=0 if sharded is not None else teacher_cache_bytes(),
                progress=lambda it: ctx.progress(it, f"distilling ({sum(t.numel() for t in tensors):,} parameters)",
                                                 lambda: f"{label} {status.get('loss', float('nan')):.4f} "
                                                         f"running {status.get('running', float('nan')):.4f}"))
            if sharded is not None:
                fsdp.gather_into(gm, sharded, kept_names)          # full values, identical on every rank
            _check_identical(tensors)
        except distill.NoGradient as e:
            ctx.message(f"heal: {e}; nothing trained end to end")
        finally:
            del student, sharded, teacher_sharded, train_tensors
            for name, p in dict(gm.named_parameters()).items():
                p.requires_grad_(flags.get(name, p.requires_grad))
            for layer in opened:
                trainable.close_shiftadd(gm, layer)
            for kind, u_name, v_name, add, weight, layout in branches:
                if kind == "linear":
                    trainable.merge_branch(gm, weight, layout, u_name, v_name, add)
            for layer in layers:
                trainable.refresh_dense(gm, layer)
        figures.update(steps=len(history), train_loss_first=history[0] if history else None,
                       train_loss_last=history[-1] if history else None,
                       train_loss_end=sum(history[-max(1, len(history) // 10):]) / max(1, len(history) // 10)
                       if history else None,
                       trained_parameters=sum(t.numel() for t in tensors),
                       lora_branches=len(branches))
        return [b for b in branches if b[0] != "linear"]

    def _rederive_maps(self, ctx, held, loss, figures) -> None:
        """vq code maps after the codebook trained: every token to the code nearest its teacher row; kept where
        the held-out loss drops."""
        gm, teacher = ctx.gm, ctx.teacher
        t_sites = find_linears(teacher)
        fwd, t_fwd = distill.forward_of(gm), distill.forward_of(teacher)
        for layer in trainable.find_layers(gm):
            if layer.kind != "vq":
                continue
            site = trainable.teacher_site(t_sites, layer.some_tensor)
            if site is None:
                continue
            codebook = layer.value(gm, "codebook").detach().float()
            rows = site.weight_out_in(teacher).detach().float()
            old = layer.value(gm, "code_map")
            new = torch.cat([torch.cdist(rows[i:i + 4096], codebook).argmin(-1)
                             for i in range(0, rows.shape[0], 4096)]).to(old.dtype)
            if torch.equal(new, old):
                continue
            before = _held_loss(fwd, t_fwd, held, loss)
            params.set_tensor(gm, layer.tensors["code_map"], new)
            after = _held_loss(fwd, t_fwd, held, loss)
            changed = int((new != old).sum())
            if after < before:
                figures["code_map_changed"] = figures.get("code_map_changed", 0) + changed
            else:
                params.set_tensor(gm, layer.tensors["code_map"], old)

    def _branch(self, gm, site, i):
        """A LoRA branch beside a dense linear site or a shift-add layer: (kind, U, V, add node, weight, layout)."""
        if isinstance(site, tuple):                      # ("shiftadd", layer)
            layer = site[1]
            signs = layer.value(gm, "signs")
            out_f, in_f = signs.shape[1], int(layer.node.args[4])
            dev = signs.device
            dtype = layer.node.args[0].meta["val"].dtype if "val" in layer.node.args[0].meta else torch.float32
            u, v, add = trainable.add_branch(gm, layer.node, layer.node.args[0], out_f, in_f, self.rank,
                                             layer.some_tensor,
                                             self.seed + i, dev, dtype)
            return ("shiftadd", u, v, add, None, None)
        w = site.weight_tensor(gm)
        u, v, add = trainable.add_branch(gm, site.node, site.x, site.out_features, site.in_features, self.rank,
                                         site.weight.target, self.seed + i, w.device, w.dtype)
        return ("linear", u, v, add, site.weight_name, site.layout)


def overfit_hint(train_end: float | None, held_out: float, batches: int, micro_steps: int) -> str:
    """A message when training fit its batches far better than it does the held-out batch (the last tenth of the
    steps' mean training loss under half the held-out loss) after visiting each of them more than once: the
    default 64 SmolLM2 samples made structured 0.8 reach training KL 0.12 against held-out 0.365; 512 samples
    (each seen once) 0.40 against 0.347, and 1.43× perplexity instead of 1.53× on a text nobody trained on."""
    if train_end is None or micro_steps <= batches or not train_end < 0.5 * held_out:
        return ""
    return (f"heal: training loss {train_end:.3g} against held-out {held_out:.3g}: the {batches} training batches "
            f"(each seen {micro_steps / batches:.1f} times) are overfit — more samples (samples=N) or data=FILE "
            f"generalise better")


def teacher_cache_bytes() -> int:
    """How many bytes of the teacher's outputs training may keep instead of recomputing them: the environment's
    REWRITE_TEACHER_CACHE_BYTES, default 2 GiB (SmolLM2's 15 default training batches take 1.5 GB); 0 recomputes
    every time. They stay where the teacher computed them — on a GPU, in its memory."""
    return calibration.env_bytes("REWRITE_TEACHER_CACHE_BYTES", 2 * 2**30, allow_zero=True)


def _split_calibrated(layers: list) -> tuple[list, list]:
    """(layers fitted without calibration data, layers their pass fitted to calibration data), by provenance."""
    data_free, calibrated = [], []
    for layer in layers:
        if layer.kind != "vq":                           # a code map has no closed-form refit
            (calibrated if (provenance(layer.node) or {}).get("calibrated") else data_free).append(layer)
    return data_free, calibrated


def _first_output(gm):
    """The recorded value (fake tensor) of the program's first tensor output, or None."""
    from torch.utils import _pytree as pytree
    node = next(n for n in gm.graph.nodes if n.op == "output")
    for leaf in pytree.tree_leaves(node.args):
        val = leaf.meta.get("val") if hasattr(leaf, "meta") else None
        if isinstance(val, torch.Tensor):
            return val
    return None


def _device(gm) -> torch.device:
    """Where the program's weights live (the first floating-point parameter or buffer; the CPU if none)."""
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.is_floating_point():
            return t.device
    return torch.device("cpu")


def _held_loss(student_fwd, teacher_fwd, held, loss) -> float:
    """The held-out loss that decides keep / undo: rank 0's, on every rank (so every rank decides alike)."""
    value = distill.evaluate(student_fwd, teacher_fwd, held, loss) if distributed.is_main() else 0.0
    return distributed.from_main(value)


def _sync_layers(gm, layers) -> None:
    """Data-parallel: every rewritten layer's tensors (the layer stage's output) from rank 0 to the others."""
    if not distributed.active():
        return
    names = sorted({name for layer in layers for name in layer.tensors.values()})
    for name, value in zip(names, distributed.broadcast_tensors([get_attr_value(gm, n) for n in names])):
        if not distributed.is_main():
            params.set_tensor(gm, name, value)


def _check_identical(tensors) -> None:
    """Data-parallel: after training every rank must hold the same trained tensors (DDP's contract; checked)."""
    if not distributed.active():
        return
    low, high = distributed.checksum(tensors)
    if low != high:
        raise InternalError("heal: the ranks' trained parameters differ after data-parallel training")


def params_dtype(gm, layer) -> torch.dtype:
    value = layer.value(gm, trainable.REQUIRED[layer.kind][0])
    return value.dtype if value.is_floating_point() else torch.float32


def _tensor_names(gm) -> dict[int, tuple[list[str], torch.Tensor]]:
    """id(tensor) → (every name bound to it (tied weights), the tensor) for every parameter and buffer."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if id(t) in groups:
            groups[id(t)][0].append(name)
        else:
            groups[id(t)] = ([name], t)
    return groups


def _snapshot(gm) -> list:
    """Every parameter and buffer tensor with the names bound to it — references, not copies: heal replaces
    tensors and never writes into one it did not create for training (`_own`), so these keep their values."""
    return [(names, t.detach()) for names, t in _tensor_names(gm).values()]


def _own(gm, names: list[str]) -> None:
    """Bind a copy of each of these tensors (once per tensor, under all its tied names) before training writes
    into it: the tensors the program holds are shared with the caller's model (and with the undo snapshot)."""
    groups = _tensor_names(gm)
    wanted = set(names)
    for tied, t in groups.values():
        if wanted.intersection(tied):
            params.set_tied(gm, tied, t.detach().clone())


def _restore(gm, snapshot: list) -> None:
    for names, t in snapshot:
        live = [name for name in names if params.has_attr(gm, name)]
        if live:
            params.set_tied(gm, live, t)
