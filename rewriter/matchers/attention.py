"""Find attention in every form the captured graphs use; shared by the attention passes.

Rules (before → site):
    sdpa            aten.scaled_dot_product_attention(q, k, v, attn_mask?, dropout_p, is_causal, scale=?)
    softmax-matmul  aten.matmul(softmax(S [+ M | masked_fill | where], -1) [→ to/dropout(eval)], v)
                    with S = (q · c₁) @ transpose(k · c₂, -2, -1) · c₃ / c₄   (any of the scalar factors optional)

Mask kinds (what `mask` holds):
    none       no mask
    causal     SDPA is_causal=True (top-left aligned, as SDPA)
    keep       a bool tensor, True = may attend                       (SDPA bool attn_mask, where(M, S, −big))
    drop       a bool tensor, True = masked                           (masked_fill(S, M, −big), where(M, −big, S))
    additive   a float tensor added to the scores (0 = attend, very negative = masked; other values are biases)

This covers hand-written attention (demo:tiny-gpt: masked_fill causal mask), F.scaled_dot_product_attention
(demo:tiny-bert, demo:tiny-vit), and HF transformers exports (GPT-2 / Llama / BERT with attn_implementation
"eager": matmul·scale + where-built additive mask + softmax + dropout(eval) + matmul; "sdpa": one SDPA node with
a bool mask and an explicit scale). Masks HF builds from data (cumsum / index / compare) are not recognised as
causal by structure; `keep_mask_value` + `classify_keep` classify them on example inputs.

Matching has no side effects: `match_attention` returns (site, None) or (None, reason).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from .linear import match_linear

aten = torch.ops.aten
SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default)
SDPA_OPS = (aten.scaled_dot_product_attention.default,)
ATTENTION_OPS = SOFTMAX_OPS + SDPA_OPS
MaskKind = Literal["none", "causal", "keep", "drop", "additive"]
BIG_NEGATIVE = -1e4          # a fill value at or below this masks a score
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
          aten.type_as.default, aten.to.dtype_layout}
_SIDE = {aten._assert_tensor_metadata.default}


@dataclass
class AttentionSite:
    node: fx.Node                 # the node whose value is the attention output (A·V matmul or SDPA)
    rule: str                     # "sdpa" | "softmax-matmul"
    q: fx.Node                    # (…, Tq, d)
    k: fx.Node                    # (…, Tk, d)
    v: fx.Node                    # (…, Tk, dv)
    mask_kind: MaskKind
    mask: fx.Node | None
    scale: float                  # the factor on q·kᵀ
    head_dim: int
    value_dim: int
    q_heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    softmax: fx.Node | None = None
    name: str = ""

    @property
    def causal(self) -> bool:
        return self.mask_kind == "causal"


def _val(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _number(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _transposed_last_two(node) -> fx.Node | None:
    """k when node is transpose(k, -2, -1) / permute swapping the last two dims."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    val = _val(node)
    if val is None:
        return None
    nd = val.dim()
    if node.target == aten.transpose.int:
        dims = sorted(int(d) % nd for d in node.args[1:3])
        if dims == [nd - 2, nd - 1]:
            return node.args[0]
    if node.target == aten.permute.default:
        perm = [int(d) % nd for d in node.args[1]]
        if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return node.args[0]
    return None


def _peel_scale(node) -> tuple[fx.Node, float]:
    """(x, c) for x·c, c·x, x/c with scalar c (repeated); else (node, 1)."""
    scale = 1.0
    while True:
        if _is_call(node, aten.mul.Tensor, aten.mul.Scalar):
            a, b = node.args[:2]
            if _number(b) is not None:
                node, scale = a, scale * _number(b)
                continue
            if _number(a) is not None:
                node, scale = b, scale * _number(a)
                continue
        if _is_call(node, aten.div.Tensor, aten.div.Scalar) and _number(node.args[1]) not in (None, 0.0):
            node, scale = node.args[0], scale / _number(node.args[1])
            continue
        return node, scale


def _match_scores(node) -> tuple[fx.Node, fx.Node, float] | None:
    """(q, k, scale) when node computes scale · q @ kᵀ."""
    node, scale = _peel_scale(node)
    while _is_call(node, *_CASTS):
        node = node.args[0]
        node, s2 = _peel_scale(node)
        scale *= s2
    if not _is_call(node, aten.matmul.default, aten.bmm.default):
        return None
    q, kt = node.args[:2]
    q, sq = _peel_scale(q)
    kt, sk = _peel_scale(kt)
    k = _transposed_last_two(kt)
    if k is None:
        return None
    k, sk2 = _peel_scale(k)
    return q, k, scale * sq * sk * sk2


def _very_negative(x) -> bool:
    value = _number(x)
    return value is not None and value <= BIG_NEGATIVE


def _match_masked_scores(node):
    """(q, k, scale, mask_kind, mask) or a reason string."""
    while _is_call(node, *_CASTS):
        node = node.args[0]
    scores = _match_scores(node)
    if scores is not None:
        return (*scores, "none", None)
    if _is_call(node, aten.add.Tensor) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        for s, m in (node.args, node.args[::-1]):
            scores = _match_scores(s)
            if scores is not None and isinstance(m, fx.Node):
                return (*scores, "additive", m)
    if _is_call(node, aten.masked_fill.Scalar):
        s, m, fill = node.args[:3]
        scores = _match_scores(s)
        if scores is not None:
            if not _very_negative(fill):
                return f"masked_fill with value {fill} is not a mask"
            return (*scores, "drop", m)
    if _is_call(node, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.self):
        cond, a, b = node.args[:3]
        sa, sb = _match_scores(a), _match_scores(b)
        if sa is not None and (_very_negative(b) or _is_full_negative(b)):
            return (*sa, "keep", cond)
        if sb is not None and (_very_negative(a) or _is_full_negative(a)):
            return (*sb, "drop", cond)
        if sa is not None or sb is not None:
            return "where() with a fill that is not very negative is not a mask"
    return f"softmax input is {getattr(node, 'name', node)}, not a (masked, scaled) q @ kᵀ"


def _is_full_negative(node) -> bool:
    return _is_call(node, aten.full.default, aten.scalar_tensor.default) and _very_negative(
        node.args[1] if node.target == aten.full.default else node.args[0])


def _attention_user(softmax: fx.Node):
    """The A·V matmul reading softmax's output (through casts and eval dropout), or a reason string."""
    node = softmax
    while True:
        users = [u for u in node.users if not _is_call(u, *_SIDE)]
        if len(users) != 1:
            return ("attention probabilities are used by several ops (e.g. returned as an output)"
                    if users else "softmax output is unused")
        user = users[0]
        if _is_call(user, *_CASTS):
            node = user
            continue
        if _is_call(user, aten.dropout.default):
            p, train = user.args[1], user.args[2] if len(user.args) > 2 else True
            if train and p:
                return "attention dropout is active (program captured in training mode)"
            node = user
            continue
        if _is_call(user, aten.matmul.default, aten.bmm.default) and user.args[0] is node:
            return user
        return f"softmax feeds {user.name}, not a matmul with values"


def _layer_name(start: fx.Node, fallback: str) -> str:
    """The module path of the projection that produces `start` (v), e.g. "blocks.0.attn"."""
    todo, seen = [start], set()
    while todo and len(seen) < 40:
        node = todo.pop(0)
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        site = match_linear(node) if node.op == "call_function" else None
        if site is not None:
            name = site.name
            return name.rsplit(".", 1)[0] if "." in name else name
        if node.op == "call_function":
            todo.extend(a for a in node.args if isinstance(a, fx.Node))
    return fallback


def _finish(node, rule, q, k, v, kind, mask, scale, softmax=None):
    qv, kv, vv = _val(q), _val(k), _val(v)
    if qv is None or kv is None or vv is None:
        return None, "no shape information on q, k or v"
    if qv.dim() < 2 or kv.dim() < 2 or vv.dim() < 2:
        return None, "q, k, v must have at least 2 dims (…, T, d)"
    if qv.shape[-1] != kv.shape[-1]:
        return None, f"q and k head dims differ ({qv.shape[-1]} vs {kv.shape[-1]})"
    if kv.shape[-2] != vv.shape[-2]:
        return None, "k and v lengths differ"
    q_heads = int(qv.shape[-3]) if qv.dim() >= 3 else 1
    kv_heads = int(kv.shape[-3]) if kv.dim() >= 3 else 1
    if qv.dim() != kv.dim() or (q_heads != kv_heads) or int(vv.shape[-3] if vv.dim() >= 3 else 1) != kv_heads:
        return None, f"grouped-query attention with mismatched heads (q {q_heads}, kv {kv_heads})"
    if mask is not None and _val(mask) is None:
        return None, "no shape information on the mask"
    if kind in ("keep", "drop") and _val(mask).dtype != torch.bool:
        return None, f"{kind} mask of dtype {_val(mask).dtype} is not boolean"
    site = AttentionSite(node, rule, q, k, v, kind, mask, float(scale), int(qv.shape[-1]), int(vv.shape[-1]),
                         q_heads, kv_heads, int(qv.shape[-2]), int(kv.shape[-2]), softmax)
    site.name = _layer_name(v, node.name)
    return site, None


def match_attention(node: fx.Node) -> tuple[AttentionSite | None, str | None]:
    """(site, None) when `node` (an SDPA or a softmax) is attention, else (None, reason)."""
    if _is_call(node, *SDPA_OPS):
        q, k, v = node.args[:3]
        mask = _arg(node, 3, "attn_mask")
        dropout = _arg(node, 4, "dropout_p", 0.0)
        is_causal = bool(_arg(node, 5, "is_causal", False))
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        if dropout:
            return None, f"attention dropout p={dropout} is active"
        if node.kwargs.get("enable_gqa", False):
            qv, kv = _val(q), _val(k)
            if qv is not None and kv is not None and qv.shape[-3] != kv.shape[-3]:
                return None, f"grouped-query attention with mismatched heads (q {qv.shape[-3]}, kv {kv.shape[-3]})"
        if scale is None:
            qv = _val(q)
            if qv is None:
                return None, "no shape information on q"
            scale = 1.0 / math.sqrt(qv.shape[-1])
        if is_causal:
            kind = "causal"
        elif mask is None:
            kind = "none"
        else:
            kind = "keep" if _val(mask) is not None and _val(mask).dtype == torch.bool else "additive"
        return _finish(node, "sdpa", q, k, v, kind, mask if kind in ("keep", "additive") else None, scale)
    if _is_call(node, *SOFTMAX_OPS):
        val = _val(node)
        if val is None:
            return None, "no shape information on the softmax"
        if int(node.args[1]) % max(val.dim(), 1) != val.dim() - 1:
            return None, "softmax is not over the last dim"
        matmul = _attention_user(node)
        if isinstance(matmul, str):
            return None, matmul
        scores = _match_masked_scores(node.args[0])
        if isinstance(scores, str):
            return None, scores
        q, k, scale, kind, mask = scores
        return _finish(matmul, "softmax-matmul", q, k, matmul.args[1], kind, mask, scale, softmax=node)
    return None, "not a softmax or scaled_dot_product_attention"


def find_attention(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
    """(sites in graph order, [(node name, reason)] for softmax / SDPA nodes that are not attention we handle)."""
    sites, misses = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        site, reason = match_attention(node)
        if site is None:
            misses.append((node.name, reason))
        else:
            sites.append(site)
    names = [s.name for s in sites]
    for s in sites:  # keep names unique (two attentions fed by one projection)
        if names.count(s.name) > 1:
            s.name = f"{s.name}:{s.node.name}"
    return sites, misses


# ---- masks as values (on example inputs) ---------------------------------------------------------------------
def keep_mask_value(kind: MaskKind, mask: torch.Tensor | None, seq_q: int, seq_k: int,
                    device: torch.device | None = None) -> torch.Tensor | str | None:
    """The bool "may attend" tensor of a mask value, None for no mask, or a reason the mask is not a 0/1 mask.
    A causal mask made here sits on `device` (that of the site's activations)."""
    if kind == "none":
        return None
    if kind == "causal":
        return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril()
    if kind == "keep":
        return mask.bool()
    if kind == "drop":
        return ~mask.bool()
    finite = mask[torch.isfinite(mask)]
    ok = (mask == 0) | (mask <= BIG_NEGATIVE)
    if not bool(ok.all()):
        bad = finite[(finite != 0) & (finite > BIG_NEGATIVE)]
        return f"additive mask holds biases (e.g. {float(bad.flatten()[0]):.3g}), not only 0 / −∞"
    return mask == 0


def sites_and_values(ctx) -> tuple[list[AttentionSite], dict]:
    """For a pass: the attention sites (unmatched ones recorded with ctx.skip and their reason) and the values of
    each site's q, k, v, output and mask on the example inputs."""
    sites, misses = find_attention(ctx.gm)
    for name, reason in misses:
        ctx.skip(name, reason)
    wanted = [n for s in sites for n in (s.q, s.k, s.v, s.node, s.mask) if n is not None]
    return sites, ctx.activations(wanted)


def classify_keep(keep: torch.Tensor | None, seq_q: int, seq_k: int) -> Literal["none", "causal", "general"]:
    """What a "may attend" mask is on the example inputs: all-visible, causal (lower-triangular), or other."""
    if keep is None:
        return "none"
    keep = keep.expand(*keep.shape[:-2], seq_q, seq_k)
    if bool(keep.all()):
        return "none"
    tril = torch.ones(seq_q, seq_k, dtype=torch.bool, device=keep.device).tril()
    if bool((keep == tril).all()):
        return "causal"
    return "general"


def keep_mask_node(gm: fx.GraphModule, site: AttentionSite, before: fx.Node, *, pass_name: str) -> fx.Node | None:
    """A graph node computing the bool "may attend" mask of a site (None for kinds none / causal)."""
    from ..ir import insert_call

    if site.mask_kind in ("none", "causal"):
        return None
    if site.mask_kind == "keep":
        return site.mask
    if site.mask_kind == "drop":
        m = site.mask
        if _is_call(m, aten.bitwise_not.default, aten.logical_not.default) and _val(m.args[0]) is not None \
                and _val(m.args[0]).dtype == torch.bool:
            return m.args[0]
        return insert_call(gm, before, aten.bitwise_not.default, (m,), pass_name=pass_name, rule="mask-invert")
    return insert_call(gm, before, aten.gt.Scalar, (site.mask, BIG_NEGATIVE), pass_name=pass_name,
                       rule="mask-from-additive")


def drop_side_nodes(gm: fx.GraphModule, softmax: fx.Node | None) -> None:
    """Erase the softmax → casts / eval dropout chain (and the metadata asserts hanging off it) once a rewrite
    made it dead. Dead-code elimination keeps dropout (a random op) and asserts, which would keep it alive."""
    chain, todo = [], [softmax] if softmax is not None else []
    while todo:
        node = todo.pop()
        chain.append(node)
        todo.extend(u for u in node.users if _is_call(u, *_SIDE, *_CASTS, aten.dropout.default))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(set(chain), key=order.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)


__all__ = ["AttentionSite", "ATTENTION_OPS", "SDPA_OPS", "SOFTMAX_OPS", "match_attention", "find_attention",
           "keep_mask_value", "classify_keep", "keep_mask_node", "drop_side_nodes"]
