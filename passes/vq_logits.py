"""`vq-logits` — LM-head logits through a k-means codebook (VQ-logits, arXiv 2505.10202).

    before   logits = h·Wᵀ (+ b)                       W: (V, d)
    after    logits = (h·Cᵀ)[..., M]  (+ b + β)        C: (K, d) codebook, M: (V,) token → code, K < V,
                                                       β: (V,) token bias (calibrated, token_bias=true)

C and M come from k-means on W's rows (k-means++ seeding and `iters` Lloyd iterations, deterministic in `seed`;
rewriter/kmeans.py), fitted to what matters for the logits when calibrated (calibrate=N > 0, the default): the
error of token v's logit is h·(W_v − C_M(v)), so with the head input's calibration Gram H = L·Lᵀ and the model's
mean next-token probabilities p̄ (N samples of `data`, rewriter/calibration.py) the pass minimises

    Σ_v π_v · (W_v − C_M(v))·H·(W_v − C_M(v))ᵀ,    π_v = p̄_v + 1/V

— k-means on the rows W_v·L weighted by π (frequent tokens get codes of their own, a rare token still takes its
nearest code), each code the π-weighted mean of its rows. With the token bias (token_bias=true, the default when
calibrated) each token also gets the offset that is best on average: the logit error h·Δ_v − β_v is smallest in
mean square at β_v = μ·Δ_v (μ: the head input's calibration mean), and what remains is Δ_v·Σ·Δ_vᵀ with the
covariance Σ = H − μ·μᵀ — so the clustering runs in Σ's metric instead of H's and β = (W − C_M)·μ follows. The
head input of an LM has a large mean (SmolLM2: ‖μ‖² is 42 % of E‖h‖²), which H's metric spends the codes on and
an offset per token absorbs for V numbers. Measured on SmolLM2 (codes=4096, the head alone, perplexity ratio on
the 2,048 evaluation tokens): H metric 7.61×, Σ metric 7.40×, Σ metric + token bias 6.28×. Data-free
(calibrate=0): plain k-means of the rows, no token bias.
The most probable tokens get codes of their own when calibrated (frequent=S, default codes // 4; 0: none): a token
that shares a code loses the part of its probability that differs from its code-mates', which costs most where
tokens are frequent; k-means shares the other codes among the rest. SmolLM2 (codes=4096, head alone, offline, with
the KL fit below): S = 0 / 500 / 1,000 / 2,000 gave 4.52 / 3.98 / 3.81 / 4.13× (closed form alone 5.88 / 5.30 /
5.21 / 5.71×). Through the pass (its own 32 self-samples): 5.20× → 5.03×, top-1 65.4 → 73.9 %, `kl_floor` 0.37 → 0.32.
A head with no more distinct rows than codes keeps plain k-means, which is exact there.
Then, calibrated, the codebook and the token bias are trained to the logits themselves (fit_steps, default 100;
`fit_to_logits`): the closed form minimises a squared logit error, but what the head must keep is the
next-token distribution, so C and β are trained by Adam on the calibration batches' head inputs to minimise the
mean KL(softmax(h·Wᵀ) ‖ softmax((h·Cᵀ)[M] + β)), the last batch held out and the fit kept only where its KL
drops. SmolLM2 (codes=4096, the head alone, offline on 32 self-samples of 128 tokens): held-out KL 1.04 → 0.86
and the evaluation perplexity ratio 5.88× → 4.52× in 100 steps (4.39× in 300; 4.12× on 7× the samples), where
the default end-to-end `heal` (64 samples, the whole program) reached 5.40×. Through the pass itself (`python -m
bench.accuracy --model smollm2 --pass "vq-logits{codes=4096}" --variants calibrated`: its own 32 self-samples,
fewer of them trained on than offline): 6.01× → 5.20× (held-out KL 0.705 → 0.592; pass 362 s, 227 s without the
fit). A floor no training of C and β crosses is reported beside it (`kl_floor` below): 0.41 nats on SmolLM2's
self-samples for this map.
Or M from `map=FILE` (a .pt tensor/list or a .json list of V ints; C = the (weighted) mean of each code's rows;
`codes` is then ignored: K = max(map) + 1). Tokens sharing a code get equal logits; when W has exactly K distinct
rows the rewrite is exact.
Weight-tied heads work: the embedding keeps the table (only the head's read of it goes away).
The head is what rewriter.matchers.linear.is_lm_head finds (tied, or as wide as an embedding table and feeding
the output, possibly through a final softmax / log_softmax), or every linear layer whose name matches the regex
`targets` (a classifier or a recommender's item head with no embedding beside it).

Graph, before → after (rule "vq-<matcher rule>"):

    z = aten.linear(h, W, b)                    z = rewrite.vq_logits(h, C, M, b)
    y = aten.log_softmax.int(z, -1)             y = rewrite.vq_logits(h, C, M, b, True)      (log_softmax=true)
    y = aten.softmax.int(z, -1)                 y = aten.exp(rewrite.vq_logits(h, C, M, b, True))

With `log_softmax=true` the normaliser is taken over codes with the cluster-size correction,
log p(v) = l_{M(v)} − logsumexp_c(l_c + log|c|), so no V-wide exp/sum is needed — without a bias: with the token
bias the normaliser sweeps V (token_bias=false keeps the O(K) one). This replaces a downstream
log_softmax / softmax over the last dim only when it is the head's ONLY consumer (directly); otherwise plain
logits are emitted and everything downstream (softmax, cross-entropy, argmax, top-k) runs unchanged on them.

Report per head: params before/after (V·d → K·d + V map entries, + V token biases), top-1 agreement (argmax
equal) and top-5 overlap (|top5 ∩ top5'|/5) with the original logits on the example inputs, and — when the first
input is a token-id tensor shaped like the logits' leading dims (a causal LM) — next-token perplexity
before/after; `kl` (mean KL(original ‖ rewritten) per row) and `kl_floor`, the least KL any codebook and token
bias could reach with this code map on the same rows (`map_kl_floor`: tokens sharing a code keep fixed proportions
within it, so what the map merges is lost whatever is trained afterwards); when calibrated,
calibrated_error = √(Σπ_v·Δ_v·G·Δ_vᵀ / Σπ_v·W_v·H·W_vᵀ), G = Σ with the token
bias, else H.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from rewriter import calibration, distill, kmeans, params, weighted
from rewriter.errors import UserError, first_line
from rewriter.ir import insert_call, replace_node
from rewriter.lazy_weights import reusing_heap
from rewriter.matchers.linear import LINEAR_OPS, find_linears, is_lm_head
from rewriter.pass_base import Contract, Pass

aten = torch.ops.aten
OP = torch.ops.rewrite.vq_logits.default
_LOG_SOFTMAX = (aten.log_softmax.int, aten._log_softmax.default)
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
FIT_ROWS_PER_STEP = 1024


def fit_codebook(w, h, token_weight, k, iters, seed, code_map, mean=None, frequent=0):
    """One head (runs in ctx.map_layers): (codebook (k, d) in W's dtype, code map (V,) int64, token bias (V,) in
    W's dtype or None) — k-means in the logit-error metric when `h` (the head input's Gram) is given, rows weighted
    by `token_weight`; with `mean` (the head input's mean) in the covariance's metric, plus the token bias; with a
    given `code_map`, only the codebook (the weighted mean of each code's rows) and the bias. `frequent` > 0 (with
    token weights, and a head with more distinct rows than codes): the `frequent` heaviest tokens get codes of
    their own, k-means shares the other k − frequent codes among the rest."""
    metric = None if h is None else residual_metric(h, mean)
    if code_map is None:
        rows = w.float() if metric is None else (w.double() @ weighted.cholesky(weighted.damped(metric))).float()
        if 0 < frequent < k and token_weight is not None and torch.unique(w, dim=0).shape[0] > k:
            order = token_weight.argsort(descending=True)
            single, rest = order[:frequent], order[frequent:]
            _, rest_map = kmeans.kmeans(rows[rest], k - frequent, iters, seed, token_weight[rest])
            code_map = torch.empty(w.shape[0], dtype=torch.long, device=w.device)
            code_map[single] = torch.arange(frequent, device=w.device)
            code_map[rest] = rest_map.to(w.device).long() + frequent
        else:
            _, code_map = kmeans.kmeans(rows, k, iters, seed, token_weight)
    codebook = kmeans.update(w.float(), code_map, torch.zeros(k, w.shape[1], device=w.device), token_weight)
    codebook = codebook.to(w.dtype)
    bias = None
    if mean is not None:
        bias = ((w.double() - codebook.double()[code_map]) @ mean.double()).to(w.dtype)
    return codebook, code_map, bias


def residual_metric(h: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """H, or with a token bias the covariance H − μ·μᵀ (float64): the logit error left after the best offset."""
    if mean is None:
        return h.double()
    m = mean.double()
    return h.double() - torch.outer(m, m)


def logit_error(w, codebook, code_map, h, token_weight, mean=None) -> float:
    """√(Σ π_v·Δ_v·G·Δ_vᵀ / Σ π_v·W_v·H·W_vᵀ), Δ_v = W_v − C_M(v) (π uniform when None), G = H, or Σ = H − μ·μᵀ
    with the token bias β_v = μ·Δ_v (the mean-square logit error relative to the logits' own)."""
    wd = w.double()
    d = wd - codebook.double()[code_map]
    hd = h.double()
    g = residual_metric(h, mean)
    pi = token_weight.double() if token_weight is not None else torch.ones(w.shape[0], dtype=torch.float64,
                                                                           device=w.device)
    num = (((d @ g) * d).sum(-1) * pi).sum()
    den = (((wd @ hd) * wd).sum(-1) * pi).sum()
    return float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())


@dataclass(frozen=True)
class VQLogitsPass(Pass):
    name = "vq-logits"
    contract = Contract.APPROXIMATE
    target_ops = LINEAR_OPS
    summary = "LM head through a k-means codebook: logits = (h·Cᵀ)[token→code map]"

    codes: int = 1024
    iters: int = 10
    seed: int = 0
    map: str = ""
    log_softmax: bool = False
    token_bias: bool = True
    targets: str = ""
    calibrate: int = calibration.DEFAULT_SAMPLES
    data: str = "self"
    seq: int = calibration.DEFAULT_SEQ
    frequent: int = -1
    fit_steps: int = 100
    fit_lr: float = 1e-2
    fuzz_options = {"calibrate": 2, "iters": 2, "codes": 8, "fit_steps": 2}

    def __post_init__(self):
        if self.codes < 1:
            raise ValueError(f"codes must be >= 1, got {self.codes}")
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        calibration.check_options(self.data, self.calibrate, self.seq)
        if self.frequent < -1 or (self.frequent > 0 and self.frequent >= self.codes and not self.map):
            raise ValueError(f"frequent must be -1 (auto: codes // 4 when calibrated), 0 or below codes={self.codes}, "
                             f"got {self.frequent}")
        if self.fit_steps < 0:
            raise ValueError(f"fit_steps must be >= 0, got {self.fit_steps}")
        if not self.fit_lr > 0:
            raise ValueError(f"fit_lr must be > 0, got {self.fit_lr}")

    def should_run(self, ctx):
        reason = super().should_run(ctx)
        if reason is None and not self._heads(ctx.gm):
            if self.targets:
                return f'no linear layer matches targets="{self.targets}"'
            return ("no LM head (a linear tied to, or as wide as, an embedding table, feeding the output "
                    "directly or through a final softmax / log_softmax); name a head with targets=REGEX")
        return reason

    def _heads(self, gm):
        if self.targets:
            return find_linears(gm, self.targets)
        return [s for s in find_linears(gm) if is_lm_head(gm, s)]

    def run(self, ctx) -> None:
        gm = ctx.gm
        heads = self._heads(gm)
        spec = calibration.spec_of(self)
        stats = calibration.layer_stats(ctx, spec, heads) if spec.samples > 0 else None
        acts = ctx.activations([n for s in heads for n in (s.x, s.node)])
        items, plans = [], []
        for site in heads:
            w = site.weight_out_in(gm).detach()
            vocab, dim = w.shape
            code_map = None
            if self.map:
                code_map = load_map(self.map, vocab).to(w.device)
                k = int(code_map.max()) + 1
                if k >= vocab:
                    raise UserError(f"vq-logits: map {self.map} uses {k} codes for a vocabulary of {vocab}; "
                                    f"it must use fewer codes than tokens")
            else:
                k = self.codes
                if k >= vocab:
                    raise UserError(f"vq-logits: codes={k} must be smaller than the vocabulary size V={vocab} of "
                                    f"head {site.name}")
            h = stats.gram(site.name) if stats is not None else None
            token_weight = None
            if stats is not None and stats.mean_probs is not None and stats.mean_probs.shape[0] == vocab:
                token_weight = (stats.mean_probs.double() + 1.0 / vocab).to(w.device)
            mean = None
            if h is not None and self.token_bias and (site.bias is None or site.bias.op == "get_attr"):
                mean = stats.mean(site.name)
            frequent = (k // 4 if self.frequent < 0 else self.frequent) if token_weight is not None else 0
            items.append((w, h, token_weight, k, self.iters, self.seed, code_map, mean, frequent))
            plans.append((site, h, token_weight, mean))
        fits = ctx.map_layers(fit_codebook, items, "fitting codebooks")
        tuned = self._fit_to_logits(ctx, spec, heads, fits) if spec.samples > 0 and self.fit_steps > 0 else {}
        for (site, h, token_weight, mean), (codebook, code_map, token_bias) in zip(plans, fits):
            codebook, token_bias, figures = tuned.get(site.name, (codebook, token_bias, {}))
            self._rewrite(ctx, site, acts[site.x], acts[site.node], codebook, code_map, token_bias, h, token_weight,
                          mean, figures)

    def _fit_to_logits(self, ctx, spec, heads, fits) -> dict:
        """{head name: (codebook, token bias, figures)} after `fit_to_logits` on the head inputs of the calibration
        batches (captured once for every head; the last batch held out)."""
        batches = [{s.name: values[s.x].detach().reshape(-1, values[s.x].shape[-1]) for s in heads}
                   for values in calibration.node_values(ctx, spec, [s.x for s in heads], "capturing head inputs")]
        out = {}
        for site, (codebook, code_map, token_bias) in zip(heads, fits):
            if len(batches) < 2:
                out[site.name] = (codebook, token_bias, {"fit_skipped": "one calibration batch: none to hold out"})
                continue
            w = site.weight_out_in(ctx.gm).detach()
            bias = site.bias_tensor(ctx.gm)
            out[site.name] = fit_to_logits(w, None if bias is None else bias.detach(), codebook, code_map,
                                           token_bias, [b[site.name] for b in batches], self.fit_steps,
                                           self.fit_lr, self.seed)
        return out

    def _rewrite(self, ctx, site, h, logits, codebook, code_map, token_bias, gram, token_weight, mean,
                 fit_figures) -> None:
        gm = ctx.gm
        w = site.weight_out_in(gm).detach()
        vocab, dim = w.shape
        k = codebook.shape[0]
        tied = len(params.readers(gm, site.weight_name)) > 1
        bias_t = site.bias_tensor(gm)
        c_name = params.add_tensor(gm, site.tensor_name("vq_codebook"), codebook.contiguous(), trainable=True)
        m_name = params.add_tensor(gm, site.tensor_name("vq_code_map"), code_map.to(torch.int32))
        c_node, m_node = params.get_attr_node(gm, c_name), params.get_attr_node(gm, m_name)
        bias_node, old_bias = site.bias, None
        if token_bias is not None:        # the head's own bias (a get_attr, see run) folds into the token bias
            if bias_t is not None:
                token_bias = (bias_t.detach().double() + token_bias.double()).to(bias_t.dtype)
                old_bias = site.bias.target
            b_name = params.add_tensor(gm, site.tensor_name("vq_token_bias"), token_bias.contiguous(),
                                       trainable=True)
            bias_node, bias_t = params.get_attr_node(gm, b_name), token_bias
        rule = f"vq-{site.rule}"

        fused = None
        users = list(site.node.users)
        if self.log_softmax:
            fused = self._fusable(users[0], logits.ndim) if len(users) == 1 else None
            if fused is None:
                ctx.message(f"{site.name}: log_softmax=true but the head's only consumer is not a log_softmax/"
                            f"softmax over the last dim; emitted plain logits")
        if fused is None:
            new = insert_call(gm, site.node, OP, (site.x, c_node, m_node, bias_node), pass_name=self.name,
                              rule=rule, replaces=site.node)
            replace_node(gm, site.node, new)
        else:
            consumer = users[0]
            new = insert_call(gm, consumer, OP, (site.x, c_node, m_node, bias_node, True), pass_name=self.name,
                              rule=f"{rule}-log-softmax", replaces=consumer)
            if consumer.target in _SOFTMAX:
                new = insert_call(gm, consumer, aten.exp.default, (new,), pass_name=self.name,
                                  rule=f"{rule}-softmax", replaces=consumer)
            replace_node(gm, consumer, new)
            gm.graph.erase_node(site.node)
        params.remove_if_unused(gm, site.weight_name)
        if old_bias is not None:
            params.remove_if_unused(gm, old_bias)

        # ---- figures
        from rewriter.ops import vq_logits as vq_op
        with torch.no_grad():
            approx = vq_op.reference(h, codebook, code_map, bias_t)
        figures = agreement(logits, approx)
        figures["kl"] = kl_divergence(logits, approx)
        figures["kl_floor"] = map_kl_floor(logits, code_map, k)
        ids = ctx.inputs[0] if ctx.inputs else None
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and tuple(ids.shape) == \
                tuple(logits.shape[:-1]) and ids.ndim >= 1 and ids.shape[-1] > 1:
            figures["perplexity_before"] = perplexity(logits, ids)
            figures["perplexity_after"] = perplexity(approx, ids)
        if gram is not None:
            figures["calibrated_error"] = logit_error(w, codebook, code_map, gram, token_weight, mean)
        sizes = torch.bincount(code_map, minlength=k)
        before = vocab * dim
        after = k * dim + vocab + (vocab if token_bias is not None else 0)
        ctx.site(site.name, codes=k, vocab=vocab, head_params_before=before, head_params_after=after,
                 head_params_cut=round(1 - after / before, 4), tied=tied, fused_log_softmax=fused is not None,
                 empty_codes=int((sizes == 0).sum()), largest_code=int(sizes.max()),
                 token_bias=token_bias is not None, **figures, **fit_figures)
        if tied:
            ctx.message(f"{site.name}: weight tied to the embedding; the table stays for the embedding "
                        f"(head reads {before:,} → {after:,} values)")

    @staticmethod
    def _fusable(node, ndim: int):
        """The consumer node when it is log_softmax/softmax over the last dim in the input's dtype, else None."""
        if node.op != "call_function" or node.target not in _LOG_SOFTMAX + _SOFTMAX:
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None or int(dim) % ndim != ndim - 1:
            return None
        if node.target in (aten.log_softmax.int, aten.softmax.int):
            dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
            if dtype is not None:
                return None
        elif len(node.args) > 2 and node.args[2]:   # _softmax(x, dim, half_to_float=True)
            return None
        return node



def fit_to_logits(w, bias, codebook, code_map, token_bias, inputs: list, steps: int, lr: float, seed: int = 0):
    """Train the codebook (and the token bias) on the head's calibration inputs to minimise the mean
    KL(softmax(h·Wᵀ + b) ‖ softmax((h·Cᵀ)[M] + b + β)) — the logits the head must reproduce, not the rows'
    metric the closed form fits. `inputs`: (rows, d) head inputs a calibration batch, the last one held out. Adam, cosine
    learning rate, each tensor at `lr` times its own root-mean-square, fp32 masters, `FIT_ROWS_PER_STEP` random
    rows a step (fewer for a vocabulary over 65,536: ≤ 2²⁶ logits a step); kept only where the held-out KL drops.
    Returns (codebook, token bias, figures) in the given dtypes."""
    train, held = inputs[:-1], inputs[-1]
    x = torch.cat(train).float()
    wf = w.float()
    bf = None if bias is None else bias.float()
    masters = {"codebook": codebook.detach().float().clone().requires_grad_(True)}
    if token_bias is not None:
        masters["token_bias"] = token_bias.detach().float().clone().requires_grad_(True)
    m = code_map.to(w.device).long()

    def logits(h, tensors):
        z = (h @ tensors["codebook"].t())[:, m]
        z = z if bf is None else z + bf
        return z if "token_bias" not in tensors else z + tensors["token_bias"]

    def teacher(h):
        return h @ wf.t() if bf is None else h @ wf.t() + bf

    rows = max(16, min(FIT_ROWS_PER_STEP, (1 << 26) // w.shape[0]))

    def held_kl(tensors):
        with torch.no_grad():
            total = sum(kl_divergence(teacher(h), logits(h, tensors)) * h.shape[0]
                        for h in held.float().split(rows))
        return total / max(held.shape[0], 1)

    before = held_kl(masters)
    opt = torch.optim.Adam([{"params": [t], "lr": lr * float(t.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
                            for t in masters.values()])
    base = [g["lr"] for g in opt.param_groups]
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.enable_grad(), reusing_heap():
        for step in range(steps):
            for group, rate in zip(opt.param_groups, base):
                group["lr"] = rate * 0.5 * (1 + math.cos(math.pi * step / steps))
            h = x[torch.randint(0, x.shape[0], (rows,), generator=generator, device="cpu").to(x.device)]
            loss = distill.kl_loss(logits(h, masters), teacher(h))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    after = held_kl(masters)
    kept = math.isfinite(after) and after < before
    figures = {"fit_kl_before": before, "fit_kl_after": after if kept else before, "fit_steps": steps,
               "fit_kept": kept}
    if not kept:
        return codebook, token_bias, figures
    new_bias = None if token_bias is None else masters["token_bias"].detach().to(token_bias.dtype)
    return masters["codebook"].detach().to(codebook.dtype), new_bias, figures


def agreement(ref: torch.Tensor, approx: torch.Tensor) -> dict:
    """top-1 agreement (argmax equal) and top-5 overlap (mean |top5 ∩ top5'| / 5) over rows."""
    r = ref.reshape(-1, ref.shape[-1]).float()
    a = approx.reshape(-1, approx.shape[-1]).float()
    top1 = (r.argmax(-1) == a.argmax(-1)).float().mean().item()
    k = min(5, r.shape[-1])
    tr, ta = r.topk(k, -1).indices, a.topk(k, -1).indices
    overlap = (tr[:, :, None] == ta[:, None, :]).any(-1).float().sum(-1).mean().item() / k
    return {"top1_agreement": top1, "top5_overlap": overlap}


def kl_divergence(ref: torch.Tensor, approx: torch.Tensor, chunk: int = 256) -> float:
    """Mean over rows of KL(softmax(ref) ‖ softmax(approx)), nats."""
    r = ref.reshape(-1, ref.shape[-1])
    a = approx.reshape(-1, approx.shape[-1])
    total = 0.0
    for i in range(0, r.shape[0], chunk):
        lr = torch.log_softmax(r[i:i + chunk].double(), -1)
        la = torch.log_softmax(a[i:i + chunk].double(), -1)
        total += float((lr.exp() * (lr - la)).sum())
    return total / max(r.shape[0], 1)


def map_kl_floor(logits: torch.Tensor, code_map: torch.Tensor, k: int, chunk: int = 256) -> float:
    """The least mean KL(p ‖ q) over the rows of `logits` that any codebook and token bias reach with `code_map`.

    q_v = Q_c(v) · s_v: whatever the codebook, tokens of one code differ only by their (static) biases, so q splits
    each code's probability Q_c in fixed proportions s. With P_c = Σ_{v∈c} p_v,
        KL(p ‖ q) = KL(P ‖ Q) + Σ_v p_v·log(p_v / (P_c(v)·s_v))  ≥  Σ p·log p − Σ_c P_c·log P_c − Σ_v p_v·log s_v,
    and the sum over rows of the last term is least at s_v = S_v / S_c(v), S = Σ_rows p (the rows' own mean split):
        floor = mean_rows(Σ p·log p − Σ_c P_c·log P_c) − Σ_v S_v·log(S_v / S_c(v)) / rows.
    Training the codebook, the biases or the layers in front of the head (heal) cannot go below it on these rows;
    only another map can."""
    z = logits.reshape(-1, logits.shape[-1])
    rows = z.shape[0]
    m = code_map.to(z.device).long()
    inner, mass = 0.0, torch.zeros(z.shape[-1], dtype=torch.float64, device=z.device)
    for i in range(0, rows, chunk):
        p = torch.softmax(z[i:i + chunk].double(), -1)
        codes = torch.zeros(p.shape[0], k, dtype=torch.float64, device=z.device).index_add_(1, m, p)
        inner += float(torch.xlogy(p, p).sum() - torch.xlogy(codes, codes).sum())
        mass += p.sum(0)
    per_code = torch.zeros(k, dtype=torch.float64, device=z.device).index_add_(0, m, mass)
    split = float(torch.xlogy(mass, mass / per_code[m].clamp_min(1e-300)).sum())
    return max((inner - split) / max(rows, 1), 0.0)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean cross-entropy) of predicting ids[..., t+1] from logits[..., t, :]."""
    pred = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    target = ids[..., 1:].reshape(-1).long()
    return float(torch.nn.functional.cross_entropy(pred, target).exp())


def load_map(path: str, vocab: int) -> torch.Tensor:
    """A token → code map from a .pt (tensor or list) or .json (list) file; int64 (V,). One-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"vq-logits: map file {path} not found")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"vq-logits: cannot read map file {path}: {first_line(e)}") \
            from None
    try:
        if isinstance(data, torch.Tensor):
            if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
                raise ValueError("not integers")
            values = data.long()
        else:
            if not isinstance(data, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in data):
                raise ValueError("not a flat list of integers")
            values = torch.tensor(list(data), dtype=torch.long)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"vq-logits: map file {path} must hold a flat list of {vocab} integers ({e})") from None
    if values.ndim != 1 or values.numel() != vocab:
        raise UserError(f"vq-logits: map file {path} has shape {list(values.shape)}; expected {vocab} entries "
                        f"(one code per token)")
    if int(values.min()) < 0:
        raise UserError(f"vq-logits: map file {path} has negative codes; codes must be 0..K-1")
    return values
