"""`softplus-attn` — replace softmax attention by length-scaled softplus attention (LSSA), optionally with
re-weighting (LSSAR); Gao & Spratling, arXiv 2501.13428. The math is in rewriter/ops/softplus_attention.py:

    A = softplus(log d · log Nᵢ · q̂k̂ᵀ) ⊙ M,  rows L1-normalised;  reweight=true: A ← ReLU(A·Nᵢ − O)^p, L1 again

Graph, before → after (every form rewriter/matchers/attention.py recognises):

    o = aten.scaled_dot_product_attention(q, k, v, M?, is_causal=c, scale=s)
    o = aten.matmul(softmax(q @ kᵀ · s [+ M | masked_fill | where]), v)
        →  o = rewrite.softplus_attention(q, k, v, keep?, c, reweight, p, train_len, eps)

where keep is the bool "may attend" mask: the SDPA bool mask itself, ~M for masked_fill (or the tensor under
its bitwise_not), M > −1e4 for additive masks (rule "mask-from-additive"; only when, on the example inputs, M
holds nothing but 0 and very negative values — other additive masks are biases and the site is skipped).

Causal and bidirectional attention both work: Nᵢ counts the keys row i may attend to, so Nᵢ = i + 1 under a
causal mask and Nᵢ = sequence length for bidirectional attention without padding (padding masks lower it).
`train_len` (the context the model was trained at; 0 = unknown) limits re-weighting to rows with Nᵢ > train_len,
i.e. to positions beyond the training context.

Calibrated (calibrate=N > 0, the default; rewriter/calibration.py's data): the paper's fixed logit scale
log d · log Nᵢ cannot make a row as sharp as the softmax it replaces where Nᵢ is small or the cosines are close, so
each head h gets a gain gₕ and a bias bₕ, A = softplus(gₕ · log d · log Nᵢ · q̂k̂ᵀ + bₕ), fitted on the site's q and
k on N calibration samples to the softmax rows P it replaces:

    min over (log gₕ, bₕ)  mean over rows  KL(Pᵢ ‖ Aᵢ),    Aᵢⱼ = softplus(zᵢⱼ) / (Σⱼ softplus(zᵢⱼ) + eps)

(the op's own normalisation, eps included; heads are independent, 2·H numbers a site), by L-BFGS from the
paper's g = 1, b = 0 on up to FIT_SCORES scores a site (query rows drawn at random, seeded, when there are more),
kept only where the KL drops. Each site is fitted on the original program's own q and k (fitting each on the q
and k of the already-rewritten layers before it, offline: 3.87× against 4.06× — not worth a capture pass per
layer). calibrate=0: the paper's LSSA.

Then the projections (fit_steps=S > 0, the default 150): cosines discard ‖q‖ and ‖k‖, which the softmax reads,
and no per-head number gives them back; the q and k projections can. Each site's W_q, W_k (the nearest linear
layers above q and k — one fused qkv layer where the model has one, v then trains with it), gₕ and bₕ are trained
so that the softplus attention, fed what the program feeds the projections, reproduces the softmax attention's
output o on the same calibration samples (rewriter/local_fit.py):

    min over W_q, W_k, log g, b   Σ_batches ‖softplus_attention(q(x), k(x), v) − o‖² / ‖o‖²

S Adam steps a site (cosine schedule, each weight at fit_lr × its own RMS, g and b at 1e-2), one calibration
batch a step of FIT_ROWS sequences (a static program: its own batch), FIT_QUERY_ROWS query rows a sequence drawn
at random against every key (the loss of a whole batch on the held-out last batch, which decides: a site keeps
its new weights only where that loss drops). Every site is fitted on the program as the pass received it (the
captured values: $REWRITE_CAPTURE_BYTES, default 1 GiB, per chunk of sites); the new weights are written once
all are fitted. The pass changes those weights in place (the report lists them: `projections`), nothing else.

Measured (SmolLM2: perplexity ratio on the 2,048 evaluation tokens, windows of 256, `python -m bench.accuracy
--model smollm2 --pass softplus-attn --variants …`; MiniLM: embedding cosine over 44 sentences):

    paper's scale (calibrate=0)                12.0×        0.843
    gains and biases (fit_steps=0)             4.17×        0.961
    + the projections (the default, 150 steps) 1.24×        0.990      pass 338 s on 2 cores (SmolLM2), 25 s
    (full query rows a step: 1.22× in 27 minutes; 30 steps 2.21×, 60 steps 1.60×)
    the default heal after it                  1.27× (1.31× before it on heal's 128-token samples)

Contract: semantic (the function changes on purpose); every site records the drift of its output against the
softmax attention it replaces on the example inputs, and, calibrated, the mean KL of its rows to the softmax's on
the calibration data before and after the gain fit, and the held-out reconstruction error before and after the
projections' fit (`fit_loss_before`, `fit_loss_after`; `fit_skipped` says why a site's projections were left
alone: a value they compute also feeds something else, a weight read elsewhere).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rewriter import calibration, local_fit, params
from rewriter.ir import insert_call, replace_node
from rewriter.matchers.attention import (ATTENTION_OPS, classify_keep, drop_side_nodes, sites_and_values,
                                         keep_mask_node, keep_mask_value)
from rewriter.ops import softplus_attention as op
from rewriter.pass_base import Contract, Pass


FIT_SCORES = 1 << 20          # scores (query rows × keys × heads) a site is fitted on, at most
FIT_ITERATIONS = 40
FIT_ROWS = 4                  # sequences a batch of the projections' fit (a dynamic program's; a static one: its own)
HEAD_LR = 1e-2                # Adam's rate for log-gains and biases in the projections' fit
FIT_QUERY_ROWS = 64           # query rows of each sequence a training step of the projections' fit computes


def output_drift(before: torch.Tensor, after: torch.Tensor) -> float:
    """max|after − before| / max|before|."""
    before, after = before.double(), after.double()
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))


@dataclass(frozen=True)
class SoftplusAttnPass(Pass):
    name = "softplus-attn"
    contract = Contract.SEMANTIC
    target_ops = ATTENTION_OPS
    summary = "softmax attention → length-scaled softplus attention (LSSA; LSSAR with reweight=true)"

    fuzz_options = {"calibrate": 2, "fit_steps": 2}

    reweight: bool = False
    p: float = 15.0
    train_len: int = 0
    eps: float = 1e-6
    calibrate: int = calibration.DEFAULT_SAMPLES
    data: str = "self"
    seq: int = calibration.DEFAULT_SEQ
    seed: int = 0
    fit_steps: int = 150
    fit_lr: float = 5e-3

    def __post_init__(self):
        calibration.check_options(self.data, self.calibrate, self.seq)
        if self.fit_steps < 0:
            raise ValueError(f"fit_steps must be >= 0 (0 = gains and biases only), got {self.fit_steps}")
        if not self.fit_lr > 0:
            raise ValueError(f"fit_lr must be > 0, got {self.fit_lr}")
        if not self.p > 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        if self.train_len < 0:
            raise ValueError(f"train_len must be >= 0 (0 = re-weight every row), got {self.train_len}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")

    def run(self, ctx) -> None:
        gm = ctx.gm
        sites, values = sites_and_values(ctx)
        ready = []
        for site in sites:
            mask_value = values.get(site.mask) if site.mask is not None else None
            q_value = values.get(site.q)
            keep = keep_mask_value(site.mask_kind, mask_value, site.seq_q, site.seq_k,
                                   q_value.device if isinstance(q_value, torch.Tensor) else None)
            if isinstance(keep, str):
                ctx.skip(site.name, keep)
                continue
            ready.append((site, keep))
        fits = self._calibrate(ctx, [site for site, _ in ready]) if self.calibrate > 0 else {}
        moved = [n for site, _ in ready for n in (site.q, site.k, site.v)
                 if fits.get(site.name, {}).get("projections")]
        now = ctx.activations(moved) if moved else {}      # q, k (and v) as the fitted projections compute them
        for site, keep in ready:
            fit = fits.get(site.name)
            head = (None, None)
            if fit is not None and fit["gain"] is not None:
                dtype = q_dtype(values.get(site.q))                  # the program's tensors keep its dtype
                fit.update(gain=fit["gain"].to(dtype), bias=fit["bias"].to(dtype))
                head = tuple(params.get_attr_node(gm, params.add_tensor(
                    gm, f"softplus_attn.{_tensor_stem(site)}_{role}", fit[role], trainable=True))
                    for role in ("gain", "bias"))
            mask_node = keep_mask_node(gm, site, site.node, pass_name=self.name)
            args = (site.q, site.k, site.v, mask_node, site.causal, self.reweight, float(self.p),
                    int(self.train_len), float(self.eps)) + (head if head[0] is not None else ())
            new = insert_call(gm, site.node, op.OP, args, pass_name=self.name,
                              rule=f"{'lssar' if self.reweight else 'lssa'}-{site.rule}", replaces=site.node,
                              calibrated=head[0] is not None)
            figures = {"rule": site.rule, "mask": classify_keep(keep, site.seq_q, site.seq_k),
                       "heads": site.q_heads, "head_dim": site.head_dim, "seq": site.seq_q}
            q, k, v = (now.get(n, values.get(n)) for n in (site.q, site.k, site.v))
            out = values.get(site.node)                              # the softmax attention, as it was
            if all(isinstance(t, torch.Tensor) for t in (q, k, v, out)):
                with torch.no_grad():
                    got = op.reference(q, k, v, keep, False, self.reweight, self.p, self.train_len, self.eps,
                                       *(fit.get(role) if fit else None for role in ("gain", "bias")))
                figures["output_drift"] = output_drift(out, got)
            if fit is not None:
                figures.update(kl_paper=fit["kl_paper"], kl_fitted=fit["kl_fitted"], fit_rows=fit["rows"])
                figures.update({key: fit[key] for key in ("fit_loss_before", "fit_loss_after", "projections",
                                                          "fit_skipped") if key in fit})
                if fit["gain"] is not None:
                    figures.update(gain_mean=float(fit["gain"].mean()), bias_mean=float(fit["bias"].mean()))
            softmax = site.softmax
            replace_node(gm, site.node, new)
            drop_side_nodes(gm, softmax)
            ctx.site(site.name, **figures)

    # ---- calibration: per-head gain and bias ------------------------------------------------------------------
    def _calibrate(self, ctx, sites: list) -> dict:
        """{site name: {"gain", "bias" (None where the fit did not lower the KL), "kl_paper", "kl_fitted",
        "rows"}}: each site's rows of paper logits z, "may attend" masks and softmax targets, gathered over the
        calibration batches, then fitted."""
        if not sites:
            return {}
        spec = calibration.spec_of(self)
        rows: dict[str, list] = {site.name: [] for site in sites}
        count = len(calibration.batches(ctx, spec))
        gen = torch.Generator().manual_seed(self.seed)
        nodes = [n for site in sites for n in (site.q, site.k, site.mask) if n is not None]
        for values in calibration.node_values(ctx, spec, nodes, f"capturing attention ({len(sites)} sites)"):
            for site in sites:
                got = _site_rows(site, values, self.eps, FIT_SCORES // max(count, 1), gen)
                if got is not None:
                    rows[site.name].append(got)
        fits = {}
        for site in ctx.progress(sites, "fitting gains and biases"):
            if rows[site.name]:
                fits[site.name] = fit_gain_bias(*_joined(rows.pop(site.name)), self.eps)
        if self.fit_steps > 0:
            self._fit_projections(ctx, [site for site in sites if site.name in fits], fits)
        return fits

    # ---- calibration: the q and k projections --------------------------------------------------------------
    def _fit_projections(self, ctx, sites: list, fits: dict) -> None:
        """Train each site's q and k projections with its gain and bias so that the softplus attention, fed what
        the program feeds the projections, reproduces the softmax attention's output (rewriter/local_fit.py);
        every site on the program as the pass received it, the new weights written once all are fitted. Updates
        `fits` with the trained gain and bias, the held-out losses and the weights' names."""
        gm = ctx.gm
        spec = calibration.spec_of(self)
        regions = {}
        for site in sites:
            region = local_fit.find_region(gm, (site.q, site.k), (site.q, site.k, site.v), site.node)
            if isinstance(region, str):
                fits[site.name]["fit_skipped"] = region
            else:
                regions[site.name] = region
        new_weights = {}
        for chunk in _capture_chunks(ctx, spec, [s for s in sites if s.name in regions], regions):
            nodes = {n for site in chunk for n in regions[site.name].inputs + [site.node]
                     + ([site.mask] if site.mask is not None else [])}
            batches = list(calibration.node_values(ctx, spec, list(nodes), f"capturing attention blocks "
                                                   f"({len(chunk)} sites)", rows=FIT_ROWS))
            for site in ctx.progress(chunk, "fitting q/k projections"):
                fit = fits[site.name]
                device = batches[0][site.node].device
                none = torch.zeros(site.q_heads, device=device)
                start = {"log_gain": none if fit["gain"] is None else fit["gain"].float().log().to(device),
                         "bias": none if fit["bias"] is None else fit["bias"].float().to(device)}
                result = local_fit.fit(gm, regions[site.name], batches, start, self._replacement(site),
                                       self.fit_steps, self.fit_lr, HEAD_LR, self.seed)
                fit.update(fit_loss_before=result["loss_before"], fit_loss_after=result["loss_after"])
                if result["weights"] is not None:
                    new_weights.update(result["weights"])
                    fit.update(gain=result["extra"]["log_gain"].exp(), bias=result["extra"]["bias"],
                               projections=sorted(result["weights"]))
            del batches
        for name, weight in new_weights.items():
            params.set_tensor(gm, name, weight)

    def _replacement(self, site):
        """(q, k, v), the batch's values, {log_gain, bias}, a generator -> (the softplus attention output, the
        softmax attention's) in fp32; with a generator only FIT_QUERY_ROWS query rows drawn from it (every key
        still: the cost of a training step is rows × keys, not keys²)."""
        masks: dict = {}          # each batch's "may attend" mask, made once

        def attend(qkv, values, numbers, generator):
            q, k, v = (t.float() for t in qkv)
            want = values[site.node].float()
            tq = q.shape[-2]
            mask = values.get(site.mask) if site.mask is not None else None
            if id(mask) not in masks:
                masks[id(mask)] = keep_mask_value(site.mask_kind, mask, tq, k.shape[-2], q.device)
            keep = masks[id(mask)]
            if generator is not None and tq > FIT_QUERY_ROWS:
                rows = torch.randperm(tq, generator=generator, device="cpu")[:FIT_QUERY_ROWS].to(q.device)
                q, want = q.index_select(-2, rows), want.index_select(-2, rows)
                if keep is not None and keep.shape[-2] == tq:
                    keep = keep.index_select(-2, rows)
            out = op.reference(q, k, v, keep, False, self.reweight, self.p, self.train_len, self.eps,
                               numbers["log_gain"].exp(), numbers["bias"])
            return out, want
        return attend


def _capture_chunks(ctx, spec, sites: list, regions: dict) -> list[list]:
    """Consecutive chunks of `sites` whose captured values (each region's inputs and the attention output, on every
    calibration batch, fp32) fit $REWRITE_CAPTURE_BYTES (default 1 GiB); a site larger than that gets a chunk
    alone. Sizes are estimated from the example inputs' values, scaled to the calibration batches' tokens."""
    budget = calibration.env_bytes("REWRITE_CAPTURE_BYTES", 1 << 30)
    io = calibration.describe(ctx)
    batches = calibration.batches(ctx, spec, rows=FIT_ROWS)
    scale = 1.0
    if io.ids_index is not None and batches and io.example:
        scale = batches[0][io.ids_index].numel() / max(1, io.example[io.ids_index].numel())
    chunks, chunk, used = [], [], 0
    for site in sites:
        nodes = regions[site.name].inputs + [site.node]
        cost = int(scale * len(batches) * sum(4 * v.numel() for v in (n.meta.get("val") for n in nodes)
                                              if isinstance(v, torch.Tensor)))
        if chunk and used + cost > budget:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(site)
        used += cost
    return chunks + [chunk] if chunk else chunks


def q_dtype(q) -> torch.dtype:
    return q.dtype if isinstance(q, torch.Tensor) and q.is_floating_point() else torch.float32


def _tensor_stem(site) -> str:
    return "".join(c if c.isalnum() else "_" for c in site.name).strip("_") or "attention"


def _site_rows(site, values: dict, eps: float, budget: int, gen: torch.Generator):
    """One batch's (z, keep, P) rows for a site, each (H, R, Tk): the paper's logits log d · log Nᵢ · q̂k̂ᵀ, the
    "may attend" mask and the softmax rows the site computed (rows with no key to attend dropped); at most
    `budget` scores, as query rows drawn at random in each sequence of the batch — only those rows are computed,
    so a long context never materialises its (B, H, T, T) scores. None when the values are missing or do not
    broadcast."""
    q, k = values.get(site.q), values.get(site.k)
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2:
        return None
    mask = values.get(site.mask) if site.mask is not None else None
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    keep = keep_mask_value(site.mask_kind, mask, tq, tk, q.device)
    if isinstance(keep, str):
        return None
    try:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], *(() if keep is None else (keep.shape[:-2],)))
        q, k = q.expand(*lead, tq, d), k.expand(*lead, tk, k.shape[-1])
        keep = (torch.ones(tq, tk, dtype=torch.bool, device=q.device) if keep is None else keep.bool()) \
            .expand(*lead, tq, tk)
    except RuntimeError:
        return None
    heads = q.shape[-3] if q.dim() == 4 else 1
    sequences = list(itertools.product(*map(range, lead[:-1] if heads > 1 else lead)))
    want = max(1, budget // (heads * tk * max(len(sequences), 1)))       # query rows per sequence
    parts = []
    for idx in sequences:
        qs, ks, ms = (t[idx] if idx else t for t in (q, k, keep))
        if heads == 1:
            qs, ks, ms = qs.unsqueeze(0), ks.unsqueeze(0), ms.unsqueeze(0)       # (1, T, ·): one head
        rows = ms.any(-1).all(0).nonzero().squeeze(1)       # rows where every head has a key to attend
        if rows.numel() > want:
            rows = rows[torch.randperm(rows.numel(), generator=gen)[:want].to(rows.device)]
        if rows.numel() == 0:
            continue
        qr, mr = qs[:, rows], ms[:, rows]
        z, mr, _ = op.logits(qr, ks, mr, False, eps)        # Nᵢ counted on each row's own mask
        scores = (qr.to(z.dtype) @ ks.to(z.dtype).transpose(-2, -1)) * site.scale
        parts.append((z, mr, scores.masked_fill(~mr, float("-inf")).softmax(-1)))
    if not parts:
        return None
    return tuple(torch.cat(group, 1) for group in zip(*parts))


def _joined(parts: list) -> tuple:
    """The batches' (z, keep, P) rows as one (H, R, Tk) each; batches with fewer keys padded with keys nobody may
    attend (a dynamic program's batches may differ in length)."""
    tk = max(z.shape[-1] for z, _, _ in parts)
    pad = lambda t, value: F.pad(t, (0, tk - t.shape[-1]), value=value)      # noqa: E731
    return (torch.cat([pad(z, 0.0) for z, _, _ in parts], 1), torch.cat([pad(k, False) for _, k, _ in parts], 1),
            torch.cat([pad(p, 0.0) for _, _, p in parts], 1))


def _log_softplus(x: torch.Tensor) -> torch.Tensor:
    """log softplus(x) without underflow: x itself below −15 (softplus(x) = eˣ to 3e-7 relative there)."""
    return torch.where(x < -15, x, torch.log(F.softplus(x.clamp_min(-15))))


def fit_gain_bias(z: torch.Tensor, keep: torch.Tensor, target: torch.Tensor, eps: float) -> dict:
    """Per-head gain g = e^θ and bias b minimising the mean row KL(P ‖ A), A = softplus(g·z + b) / (Σ + eps),
    by L-BFGS from g = 1, b = 0 (z, keep, target: (H, R, Tk)). Returns gain / bias (None when the fit does
    not lower the KL), the KL before and after, and the number of rows."""
    z, target = z.float(), target.float()
    heads = z.shape[0]
    entropy = -torch.where(keep & (target > 0), target * target.clamp_min(1e-30).log(), 0.0).sum(-1).mean()
    log_eps = torch.tensor(math.log(eps), device=z.device)

    def kl(theta, bias):
        x = theta.exp()[:, None, None] * z + bias[:, None, None]
        ls = _log_softplus(x).masked_fill(~keep, float("-inf"))
        norm = torch.logaddexp(torch.logsumexp(ls, -1, keepdim=True), log_eps)
        ce = -torch.where(keep, target * (ls - norm), 0.0).sum(-1).mean()
        return ce - entropy

    theta = torch.zeros(heads, device=z.device, requires_grad=True)
    bias = torch.zeros(heads, device=z.device, requires_grad=True)
    with torch.no_grad():
        before = float(kl(theta, bias))
    opt = torch.optim.LBFGS([theta, bias], lr=1.0, max_iter=FIT_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kl(theta, bias)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        after = float(kl(theta, bias))
    fitted = math.isfinite(after) and after < before
    return {"gain": theta.detach().exp() if fitted else None, "bias": bias.detach().clone() if fitted else None,
            "kl_paper": before, "kl_fitted": after if fitted else before, "rows": int(z.shape[1])}
