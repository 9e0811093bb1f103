"""Projections of a dense weight W (out m × in n) onto structured forms, shared by the structured-FFN passes.

Each projection minimises ‖W − W'‖_F over its structure (or ‖(W − W')·Xᵀ‖_F in the activation-weighted variant):

Monarch (Dao et al. 2022; layout of `rewriter/ops/monarch_linear.py`, b blocks, p = ⌈n/b⌉, s = ⌈m/b⌉, q = min(p, s)):
    W' = P₂·L·P₁·R. Entry W'[s'·b + c, k·p + p'] = Σ_{i ∈ I(c,k)} w2[c, s', i] · w1[k, i·b + c − k·q, p'] with
    I(c,k) = {i : k·q ≤ i·b + c < (k+1)·q}. Every factor entry appears in exactly one (c, k) term, so the b² slices
    W[c::b, k·p:(k+1)·p] (rows strided by b, a contiguous column block; shape s × p) are independent matrices of rank
    ≤ |I(c,k)| (= q/b when b | q). The optimum is a truncated SVD of each slice (Eckart–Young), √σ split into
    w2[c, :, I] and w1[k, J, :]. W is zero-padded to (b·s, b·p) when b does not divide the sizes.
Block-diagonal (plain): W' = diag(V_1 … V_b); the blocks are independent and off-diagonal entries cannot be matched,
    so copying the diagonal blocks of W is optimal. Output rows beyond b·t are truncated (t = ⌈m/b⌉).
BlockDense (W' = U_r·V_b, StructuredFFN): column block k of W' is U_k·V_k with U_k = U_r[:, k·t:(k+1)·t] (m × t),
    so each column block W[:, k·p:(k+1)·p] independently takes its rank-t truncated SVD (√σ split).
Low rank (W' = U·V): truncated SVD W ≈ U_r·diag(σ)·V_rᵀ; U = U_r·√σ, V = √σ·V_rᵀ (Eckart–Young: error is the SVD
    tail √Σ_{i>r} σᵢ² / ‖W‖).
Calibrated (every form, with a calibration Gram H = XᵀX/rows): minimise tr(ΔW·H·ΔWᵀ) = ‖X·ΔWᵀ‖²/rows instead —
    SVD-LLM whitening for low rank, alternating exact least squares for BlockDense and Monarch, the conditional-
    mean correction for plain block-diagonal (rewriter/weighted.py). Exactly structured weights stay exact.

All projections run in float32 (float64 for float64 weights) and the factors are cast to the weight dtype once.
`apply` replaces a LinearSite by the new op node and removes the dense weight through `rewriter.params`;
`project_sites` runs a pass's per-layer fit through ctx.map_layers and records each layer's figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from . import calibration, params, weighted
from .ir import insert_call, replace_node
from .matchers.linear import LinearSite, match_linear
from .ops import blockdiag_linear, lowrank_linear, monarch_linear

aten = torch.ops.aten

# Pre-merge threshold (rows of x at or below which the stored dense product is used), measured with
# `python -m bench.structured_ffn` on the development machine (2 shared cores, torch 2.13): with 1 thread the dense
# product wins only at 1 token (256->1024 layers; never for 1024->4096); with 2 contended threads the crossover
# wandered between 1 and 64 tokens from run to run. Override with pre_merge_tokens=.
PRE_MERGE_TOKENS = 1


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


# ---- the factored forms ----------------------------------------------------------------------------------------
@dataclass
class Factored:
    """A structured approximation of one (m × n) weight. `factors` are in the dtype they will be stored in."""

    kind: str                       # "monarch" | "blockdiag" | "blockdense" | "lowrank"
    out_features: int
    in_features: int
    factors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def cast(self, dtype: torch.dtype) -> "Factored":
        return Factored(self.kind, self.out_features, self.in_features,
                        {k: v.to(dtype).contiguous() for k, v in self.factors.items()}, dict(self.info))

    @property
    def params(self) -> int:
        return sum(v.numel() for v in self.factors.values())

    def flops_per_row(self) -> int:
        f = self.factors
        if self.kind == "monarch":
            b, q, p = f["w1"].shape
            return 2 * q * (b * p + b * f["w2"].shape[1])
        if self.kind in ("blockdiag", "blockdense"):
            b, t, p = f["blocks"].shape
            return 2 * b * t * p + (2 * self.out_features * b * t if "u" in f else 0)
        return 2 * f["u"].shape[1] * (self.out_features + self.in_features)

    def dense(self, dtype: torch.dtype = torch.float64, rows: int = 1024) -> torch.Tensor:
        """The (m, n) matrix this form computes, in `dtype`: the layer applied to the identity, `rows` input
        columns at a time (a whole float64 identity of a 5632-wide layer would be 254 MB on its own)."""
        f = {k: v.to(dtype) for k, v in self.factors.items()}
        n, m = self.in_features, self.out_features
        if self.kind == "lowrank":
            return f["u"] @ f["v"]
        device = f[next(iter(f))].device
        out = torch.empty(m, n, dtype=dtype, device=device)
        for s in range(0, n, rows):
            k = min(rows, n - s)
            eye = torch.zeros(k, n, dtype=dtype, device=device)
            eye[:, s:s + k].fill_diagonal_(1)
            if self.kind == "monarch":
                out[:, s:s + k] = monarch_linear.reference(eye, f["w1"], f["w2"], None, m).t()
            else:
                out[:, s:s + k] = blockdiag_linear.reference(eye, f["blocks"], f.get("u"), None, m).t()
        return out


def top_svd(a: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_t·V_t/√σ, √σ·V_tᵀ) = the rank-t truncated SVD of each matrix in `a` (…, r, c), √σ split, so that their
    product is the best rank-t approximation. Small matrices use torch.linalg.svd; large ones the eigenvectors
    of the smaller Gram matrix in float64 (same optimum, ~10× faster on CPU for 4096 × 1024 slices)."""
    r, c = a.shape[-2:]
    t = min(t, r, c)
    if min(r, c) <= 256:
        u, sv, vh = torch.linalg.svd(a, full_matrices=False)
        root = sv[..., :t].sqrt()
        return u[..., :t] * root[..., None, :], root[..., :, None] * vh[..., :t, :]
    ad = a.double()
    if r >= c:
        evals, vecs = torch.linalg.eigh(ad.transpose(-1, -2) @ ad)       # ascending
        v = vecs[..., -t:].flip(-1)                                       # (…, c, t)
        sv = evals[..., -t:].flip(-1).clamp_min(0).sqrt()
        inv_root = torch.where(sv > 0, sv.rsqrt(), torch.zeros_like(sv))
        left = (ad @ v) * inv_root[..., None, :]
        right = sv.sqrt()[..., :, None] * v.transpose(-1, -2)
    else:
        evals, vecs = torch.linalg.eigh(ad @ ad.transpose(-1, -2))
        u = vecs[..., -t:].flip(-1)                                       # (…, r, t)
        sv = evals[..., -t:].flip(-1).clamp_min(0).sqrt()
        inv_root = torch.where(sv > 0, sv.rsqrt(), torch.zeros_like(sv))
        left = u * sv.sqrt()[..., None, :]
        right = (u.transpose(-1, -2) @ ad) * inv_root[..., :, None]
    return left.to(a.dtype), right.to(a.dtype)


# ---- Monarch -------------------------------------------------------------------------------------------------
def monarch_sizes(m: int, n: int, blocks: int) -> tuple[int, int, int]:
    """(p, q, s): input block size, inner block size, output block size (fly's MonarchLinear choice)."""
    p, s = -(-n // blocks), -(-m // blocks)
    return p, min(p, s), s


def monarch_skip_reason(m: int, n: int, blocks: int, pad: bool = True) -> str | None:
    if blocks < 1:
        return "blocks must be >= 1"
    if n < blocks or m < blocks:
        return f"layer {n}->{m} is smaller than blocks={blocks}"
    if not pad and (n % blocks or m % blocks):
        return f"blocks={blocks} does not divide {n}->{m} and pad=false"
    return None


def monarch_project(w: torch.Tensor, blocks: int, gram: torch.Tensor | None = None, iters: int = 4) -> Factored:
    """Optimal Monarch projection of W (m, n) with `blocks` blocks (see module docstring); with a calibration
    `gram` (n × n) the weighted projection (rewriter/weighted.py; needs b | q, else the Frobenius one)."""
    m, n = w.shape
    b = blocks
    p, q, s = monarch_sizes(m, n, b)
    work = _work_dtype(w)
    if gram is not None and q % b == 0:
        w1, w2 = weighted.monarch(w, gram, b, iters)
        fit = Factored("monarch", m, n, {"w1": w1.to(work).to(w.dtype), "w2": w2.to(work).to(w.dtype)},
                       {"blocks": b, "inner": q, "calibrated": True})
        return _better(w, gram, fit, monarch_project(w, blocks))
    wx = torch.zeros(b * s, b * p, dtype=work, device=w.device)
    wx[:m, :n] = w.to(work)
    slices = wx.view(s, b, b, p).permute(1, 2, 0, 3)               # [c, k, s', p'] = W[s'·b + c, k·p + p']
    w1 = torch.zeros(b, q, p, dtype=work, device=w.device)
    w2 = torch.zeros(b, s, q, dtype=work, device=w.device)
    if q % b == 0:
        us, vs = top_svd(slices, q // b)                            # [c, k, s', j1], [c, k, j1, p']
        # w2[c, s', k·t + j1] = us[c, k, s', j1];  w1[k, j1·b + c, p'] = vs[c, k, j1, p']
        w2 = us.permute(0, 2, 1, 3).reshape(b, s, q)
        w1 = vs.permute(1, 2, 0, 3).reshape(b, q, p)
    else:
        for c in range(b):
            for k in range(b):
                idx = [i for i in range(q) if k * q <= i * b + c < (k + 1) * q]
                if not idx:
                    continue
                left, right = top_svd(slices[c, k], len(idx))
                t = left.shape[-1]
                ii = torch.tensor(idx[:t], device=w.device)
                w2[c][:, ii] = left
                w1[k][ii * b + c - k * q] = right
    return Factored("monarch", m, n, {"w1": w1.to(w.dtype), "w2": w2.to(w.dtype)}, {"blocks": b, "inner": q})


def _better(w: torch.Tensor, gram: torch.Tensor, fit: Factored, plain: Factored) -> Factored:
    """The calibrated fit, or the Frobenius projection where that has the lower calibrated error (the alternating
    fit is a local optimum: this makes 'calibrated is never worse under H than data-free' hold always)."""
    if weighted.relative_error(w, plain.dense(), gram) < weighted.relative_error(w, fit.dense(), gram):
        plain.info["calibrated"] = "frobenius kept"
        return plain
    return fit


# ---- block-diagonal and BlockDense -------------------------------------------------------------------------------
def blockdiag_skip_reason(m: int, n: int, blocks: int, pad: bool = True) -> str | None:
    return monarch_skip_reason(m, n, blocks, pad)


def _column_blocks(w: torch.Tensor, blocks: int, rows: int | None = None) -> torch.Tensor:
    """W zero-padded to (rows or m, b·p), as (b, rows, p) column blocks, in the working dtype."""
    m, n = w.shape
    p = -(-n // blocks)
    rows = m if rows is None else rows
    wx = torch.zeros(rows, blocks * p, dtype=_work_dtype(w), device=w.device)
    wx[:m, :n] = w.to(wx.dtype)
    return wx.view(rows, blocks, p).permute(1, 0, 2)


def blockdiag_project(w: torch.Tensor, blocks: int, gram: torch.Tensor | None = None) -> Factored:
    """Plain block-diagonal: the diagonal blocks of W (optimal: nothing else can be matched); with a calibration
    `gram`, the blocks that minimise the output error (the conditional-mean correction, rewriter/weighted.py)."""
    m, n = w.shape
    if gram is not None:
        blk = weighted.blockdiag_plain(w, gram, blocks).to(_work_dtype(w))
        return Factored("blockdiag", m, n, {"blocks": blk.to(w.dtype)}, {"blocks": blocks, "calibrated": True})
    t = -(-m // blocks)
    cols = _column_blocks(w, blocks, rows=blocks * t)              # [k, row, p']
    blk = torch.stack([cols[k, k * t:(k + 1) * t] for k in range(blocks)])  # (b, t, p)
    return Factored("blockdiag", m, n, {"blocks": blk.to(w.dtype)}, {"blocks": blocks})


def blockdense_rank(m: int, n: int, blocks: int, rank: int | None) -> int:
    """Per-block inner size t (rank = b·t total); default half the smaller dimension."""
    p = -(-n // blocks)
    total = rank if rank is not None else min(m, n) // 2
    return max(1, min(total // blocks, p, m))


def blockdense_project(w: torch.Tensor, blocks: int, rank: int | None = None, gram: torch.Tensor | None = None,
                       iters: int = 4) -> Factored:
    """BlockDense W ≈ U_r·V_b: rank-t truncated SVD of each column block (√σ split); with a calibration `gram`,
    alternating exact weighted least squares (rewriter/weighted.py)."""
    m, n = w.shape
    t = blockdense_rank(m, n, blocks, rank)
    if gram is not None:
        p = -(-n // blocks)
        wx = torch.zeros(m, blocks * p, dtype=torch.float64, device=w.device)
        wx[:, :n] = w.double()
        u, v = weighted.blockdense(wx, weighted.damped(gram, blocks * p), blocks, t, iters)
        work = _work_dtype(w)
        fit = Factored("blockdense", m, n, {"blocks": v.to(work).to(w.dtype), "u": u.to(work).to(w.dtype)},
                       {"blocks": blocks, "rank": blocks * t, "calibrated": True})
        return _better(w, gram, fit, blockdense_project(w, blocks, rank))
    cols = _column_blocks(w, blocks)                               # (b, m, p)
    left, blk = top_svd(cols, t)                                    # (b, m, t), (b, t, p)
    ur = left.permute(1, 0, 2).reshape(m, blocks * t)
    return Factored("blockdense", m, n, {"blocks": blk.to(w.dtype), "u": ur.to(w.dtype)},
                    {"blocks": blocks, "rank": blocks * t})


# ---- low rank ------------------------------------------------------------------------------------------------
def choose_rank(sv: torch.Tensor, m: int, n: int, rank: int | None = None, ratio: float | None = None,
                energy: float | None = None) -> int:
    """Rank from an explicit rank, a parameter ratio r·(m+n) ≈ ratio·m·n, or an energy fraction of Σσ²."""
    full = min(m, n)
    if rank is not None:
        return max(1, min(rank, full))
    if ratio is not None:
        return max(1, min(full, int(ratio * m * n / (m + n))))
    e = sv.double() ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return max(1, min(full, int((cum < (energy if energy is not None else 0.95) - 1e-12).sum()) + 1))


def lowrank_project(w: torch.Tensor, rank: int | None = None, ratio: float | None = None,
                    energy: float | None = None, activations: torch.Tensor | None = None,
                    gram: torch.Tensor | None = None) -> Factored:
    """Truncated SVD W ≈ U·V with √σ in both factors; with a calibration Gram (or `activations` (…, n), whose
    Gram is taken) SVD-LLM's truncation-aware whitening, and `energy` counts output energy."""
    m, n = w.shape
    work = _work_dtype(w)
    if activations is not None and gram is None:
        x = activations.reshape(-1, activations.shape[-1]).double()
        gram = x.t() @ x / max(1, x.shape[0])
    if gram is not None:
        fu, fv, _ = weighted.lowrank(w, gram, lambda sv: choose_rank(sv, m, n, rank, ratio, energy))
        r = fu.shape[1]
    else:
        u, sv, vh = torch.linalg.svd(w.to(work), full_matrices=False)
        r = choose_rank(sv, m, n, rank, ratio, energy)
        rs = sv[:r].sqrt()
        fu, fv = u[:, :r] * rs, rs[:, None] * vh[:r]
    return Factored("lowrank", m, n, {"u": fu.to(work).to(w.dtype), "v": fv.to(work).to(w.dtype)},
                    {"rank": r, "calibrated": gram is not None})


# ---- errors ------------------------------------------------------------------------------------------------------
def weight_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − W'‖_F / ‖W‖_F in float64."""
    wd = w.double()
    return float(torch.linalg.norm(wd - approx.double()) / torch.linalg.norm(wd).clamp_min(1e-300))


def output_error(x: torch.Tensor, w: torch.Tensor, approx: torch.Tensor, bias: torch.Tensor | None) -> float:
    """‖X·(W − W')ᵀ‖_F / ‖X·Wᵀ + b‖_F on the rows of X, in float64."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    y = x2 @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    diff = x2 @ (w.double() - approx.double()).t()
    return float(torch.linalg.norm(diff) / torch.linalg.norm(y).clamp_min(1e-300))


# ---- graph surgery ------------------------------------------------------------------------------------------------
OPS = {"monarch": monarch_linear.OP, "blockdiag": blockdiag_linear.OP, "blockdense": blockdiag_linear.OP,
       "lowrank": lowrank_linear.OP}


_WEIGHT_VIEWS = (aten.t.default, aten.permute.default, aten.transpose.int, aten.numpy_T.default)


def apply(gm: fx.GraphModule, site: LinearSite, fac: Factored, *, pass_name: str,
          pre_merge: int | None = None, calibrated: bool = False) -> fx.Node:
    """Replace `site` by the op computing `fac` (factors become trainable Parameters), remove the dense weight
    (kept when another op still reads it). With `pre_merge` (a row threshold) the product is stored as a frozen
    buffer and used by the op for inputs with at most that many rows. `calibrated`: `fac` was fitted to calibration
    data (recorded in the node's provenance; heal's default mode skips the layer refit of such layers)."""
    fresh = match_linear(site.node)   # earlier rewrites may have replaced this layer's input node
    if fresh is not None:
        site = fresh
    layer = site.name
    f = fac.factors
    names = {k: params.add_tensor(gm, site.tensor_name(f"{fac.kind}_{k}"), v, trainable=True) for k, v in f.items()}
    nodes = {k: params.get_attr_node(gm, name) for k, name in names.items()}
    dense = None
    threshold = 0
    if pre_merge is not None and pre_merge > 0:
        d = fac.dense(torch.float64).to(next(iter(f.values())).dtype)   # product in fp64, rounded once
        dname = params.add_tensor(gm, site.tensor_name(f"{fac.kind}_premerged"), d)
        dense, threshold = params.get_attr_node(gm, dname), int(pre_merge)
    if fac.kind == "monarch":
        args = (site.x, nodes["w1"], nodes["w2"], site.bias, fac.out_features, dense, threshold)
    elif fac.kind in ("blockdiag", "blockdense"):
        args = (site.x, nodes["blocks"], nodes.get("u"), site.bias, fac.out_features, dense, threshold)
    else:
        args = (site.x, nodes["u"], nodes["v"], site.bias, dense, threshold)
    new = insert_call(gm, site.node, OPS[fac.kind], args, pass_name=pass_name, rule=f"{fac.kind}-{site.rule}",
                      replaces=site.node, calibrated=calibrated)
    old_inputs = [a for a in site.node.all_input_nodes]
    replace_node(gm, site.node, new)
    for node in old_inputs:  # the t()/permute view of the weight (addmm-t / mm-t layouts) is dead now
        if node.op == "call_function" and not node.users and node.target in _WEIGHT_VIEWS:
            gm.graph.erase_node(node)
    params.remove_if_unused(gm, site.weight_name)
    return new


def layer_rows(site: LinearSite) -> int:
    val = site.x.meta.get("val")
    if isinstance(val, torch.Tensor) and val.shape[-1]:
        return int(val.numel() // val.shape[-1])
    return 0


def project_sites(ctx, sites: list[LinearSite], fit: Callable[..., "Factored | str"], options: tuple = (), *,
                  pass_name: str, spec: "calibration.DataSpec | None" = None, max_error: float | None = None,
                  pre_merge: int | None = None, description: str = "projecting") -> None:
    """Fit every site with `fit(W_out_in, H, *options)` — a module-level function returning a Factored or a skip
    reason, run through ctx.map_layers; H is the layer's calibration Gram (calibrated when `spec.samples` > 0,
    else None). Then measure, rewrite and record each layer: weight error, output error on the example inputs,
    and with calibration the calibrated output error (which max_error is judged on)."""
    gm = ctx.gm
    calibrated = spec is not None and spec.samples > 0
    acts = ctx.activations([s.x for s in sites]) if sites else {}
    # (site, fac, figures), or (site, skip reason, figures or None): recorded and rewritten in site order once every
    # chunk is fitted, so that each chunk's statistics saw the program as the pass received it
    accepted = []
    for chunk in (calibration.site_chunks(ctx, spec, sites) if calibrated else [sites]):
        stats = calibration.layer_stats(ctx, spec, chunk) if calibrated else None
        items = []
        for site in chunk:
            w = site.weight_out_in(gm).detach()
            h = stats.gram(site.name) if stats is not None else None
            items.append((w, h) + tuple(options))
        results = ctx.map_layers(fit, items, description)
        for site, item, result in zip(chunk, items, results):
            w, h = item[0], item[1]
            if isinstance(result, str):
                accepted.append((site, result, None))
                continue
            fac = result
            approx = fac.dense()
            x = acts.get(site.x)
            bias = site.bias_tensor(gm)
            bias = bias.detach() if bias is not None else None
            w_err = weight_error(w, approx)
            o_err = output_error(x, w, approx, bias) if isinstance(x, torch.Tensor) else None
            c_err = weighted.relative_error(w, approx, h) if h is not None else None
            # the report's site table shows the first five figures: keep the ones that matter first
            figures = dict(params_before=w.numel(), params_after=fac.params, weight_error=w_err, output_error=o_err)
            if c_err is not None:
                figures["calibrated_error"] = c_err
            if fac.params >= w.numel():
                accepted.append((site, f"{fac.kind} form has {fac.params} params >= dense {w.numel()}: no saving",
                                 None))
                continue
            judged = c_err if c_err is not None else o_err
            if max_error is not None and judged is not None and judged > max_error:
                accepted.append((site, f"output error {judged:.3g} > max_error {max_error:g}", figures))
                continue
            accepted.append((site, _spilled(ctx, fac), figures))
        del stats, items, results
    for site, fac, figures in accepted:
        if isinstance(fac, str):
            if figures is None:
                ctx.skip(site.name, fac)
            else:
                ctx.site(site.name, "skipped", reason=fac, **figures)
            continue
        rows, numel = layer_rows(site), figures["params_before"]
        apply(gm, site, fac, pass_name=pass_name, pre_merge=pre_merge, calibrated=calibrated)
        dense_path = pre_merge is not None and 0 < rows <= pre_merge
        ctx.site(site.name, **figures, flops_before=2 * rows * numel,
                 flops_after=2 * rows * numel if dense_path else rows * fac.flops_per_row(),
                 kind=fac.kind, **fac.info)


def _spilled(ctx, fac: Factored) -> Factored:
    """`fac` with its factors moved to scratch files when the program's weights are mapped from a checkpoint
    (rewriter/lazy_weights.py): every layer's factors wait in `accepted` until the last chunk is fitted, and in
    RAM they would add up to about half the checkpoint for blocks=4. Same tensors, same bytes."""
    store = ctx.resources.get("weight_store")
    if store is None:
        return fac
    return Factored(fac.kind, fac.out_features, fac.in_features,
                    {k: store.spill_tensor(v) for k, v in fac.factors.items()}, fac.info)


def default_sites(gm: fx.GraphModule, targets: str, exclude: str) -> list[LinearSite]:
    """Matched linears; without `targets`, every linear except an LM head."""
    from .matchers.linear import find_linears, is_lm_head
    sites = find_linears(gm, targets or None, exclude or None)
    if not targets:
        sites = [s for s in sites if not is_lm_head(gm, s)]
    return sites
