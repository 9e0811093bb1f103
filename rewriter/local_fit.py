"""Local reconstruction: train the projections in front of a replaced operation so that the replacement, fed what
the original program feeds it, reproduces the original operation's output.

    minimise over W (the projections) and φ (the replacement's own numbers)
        Σ_batches ‖f(x; W, φ) − o‖² / ‖o‖²

x — every value the graph region reads from the rest of the program (the projections' input, rotary tables, …),
o — the original operation's output, both captured on calibration batches of the program as it is;
f — the region of the graph from the projections to the operation's inputs, replayed op by op with the trained
weights, then the replacement (given by the caller). The region is found in the graph, not assumed: for an
attention site, the nearest linear layers above q and k, and every node between them and q, k, v (views,
transposes, rotary embedding, the repeat of grouped key heads) — see `find_region`.

Why: `softplus-attn` replaces softmax(q·kᵀ·s) by a softplus of cosines; per-head gains and biases make rows as
sharp as the softmax's, but the softmax also reads ‖q‖ and ‖k‖, which cosines discard. Letting W_q and W_k move
recovers most of it: SmolLM2's perplexity ratio goes from 4.17× with fitted gains alone to 1.24× with no end-to-end
training (passes/softplus_attn.py has the measurements).

The training is Adam with a cosine learning-rate schedule, one calibration batch a step (cycled in order), each
weight at `lr` times its own root-mean-square (one setting for any model's scale), fp32 master copies whatever
the program's dtype; the last batch is held out, and the fit is kept only where it lowers the held-out loss.
Deterministic: no randomness besides the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from . import params
from .ir import get_attr_value
from .lazy_weights import reusing_heap
from .matchers.linear import match_linear


@dataclass
class Region:
    weights: list[str]           # qualified names of the trained weights (one per projection)
    nodes: list[fx.Node]         # the nodes replayed, in graph order
    inputs: list[fx.Node]        # the values captured from the program (read by the region, not computed in it)
    outputs: tuple               # the nodes whose values the replacement takes (q, k, v)


def _ancestors(nodes) -> set:
    seen, stack = set(nodes), list(nodes)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _descendants(nodes, last: int, order: dict) -> set:
    """Descendants (and the nodes themselves) up to graph position `last`."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        for u in stack.pop().users:
            if u not in seen and order[u] <= last:
                seen.add(u)
                stack.append(u)
    return seen


def _nearest_linear(node: fx.Node, order: dict):
    """The linear layer closest above `node` (the last one in graph order among its ancestors), or None."""
    found = [s for s in map(match_linear, _ancestors([node])) if s is not None]
    return max(found, key=lambda s: order[s.node]) if found else None


def find_region(gm: fx.GraphModule, trained: tuple, outputs: tuple, consumer: fx.Node) -> Region | str:
    """The region from the linear layers nearest above each node of `trained` (q and k) to `outputs` (q, k, v),
    or why there is none. `consumer` is the node being replaced (the attention output): the nodes between the
    outputs and it are the ones the replacement makes dead. A region is refused when one of its values also
    feeds something else (training would change it), when a trained weight is read elsewhere or under several
    names, or when it holds anything but plain ops."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    linears = {}
    for node in trained:
        site = _nearest_linear(node, order)
        if site is None:
            return f"no linear layer computes {node.name}"
        linears[site.node] = site
    above = _ancestors(outputs)
    region = above & _descendants(list(linears), max(order[o] for o in outputs), order)
    internal = _descendants(list(outputs), order[consumer], order) & _ancestors([consumer])
    for node in region:
        if node.op != "call_function" or not callable(node.target) or isinstance(node.target, torch.nn.Module):
            return f"{node.name} is not a plain op"
        outside = [u for u in node.users if u not in region and u not in internal]
        if outside:
            return f"{node.name} also feeds {outside[0].name}"
    weights, prefix = [], set()
    for site in linears.values():
        name = site.weight_name
        if len(params.aliases(gm, name)) > 1:
            return f"weight {name} is tied to another name"
        readers = params.readers(gm, name)
        if readers == [site.node]:
            pass
        elif len(readers) == 1 and list(readers[0].users) == [site.node]:     # aten.t(W) feeding a decomposed linear
            prefix.add(readers[0])
        else:
            return f"weight {name} is read by another op"
        weights.append(name)
    nodes = sorted(region | prefix, key=order.get)
    inner = set(nodes)
    trained_weights = {n for n in gm.graph.nodes if n.op == "get_attr" and n.target in weights}
    inputs = sorted({a for n in nodes for a in n.all_input_nodes if a not in inner and a not in trained_weights}
                    | {o for o in outputs if o not in inner}, key=order.get)
    return Region(weights, nodes, inputs, tuple(outputs))


def replay(region: Region, values: dict, weights: dict[str, torch.Tensor]) -> tuple:
    """The region's outputs from captured `values` ({node: value}) and the (trained) `weights` ({name: tensor})."""
    env: dict = {}

    def value(a):
        if a in env:
            return env[a]
        if a.op == "get_attr" and a.target in weights:
            return weights[a.target]
        return values[a]

    for node in region.nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        env[node] = node.target(*args, **kwargs)
    return tuple(value(o) for o in region.outputs)


def normalised_error(out: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    want = want.float()
    return (out.float() - want).pow(2).sum() / want.pow(2).sum().clamp_min(1e-30)


def as_float(values: dict) -> dict:
    """Captured values with floating-point tensors in float32 (bf16 / fp16 programs train in fp32)."""
    return {n: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64
            else v for n, v in values.items()}


def fit(gm: fx.GraphModule, region: Region, batches: list[dict], extra: dict[str, torch.Tensor],
        replacement: Callable, steps: int, lr: float, extra_lr: float, seed: int = 0) -> dict:
    """Train the region's weights and the replacement's `extra` tensors ({name: fp32 tensor}) on `batches`
    (captured {node: value} dicts, the last one held out when there are two or more). `replacement(replay
    outputs, batch, extra, generator)` returns (output, what it must equal); with a generator (training steps)
    it may compute a random part of both (the held-out loss passes None: everything). Returns {"weights": {name: tensor in
    the weight's dtype} or None when the held-out loss did not drop, "extra": the trained extra tensors (or the
    given ones), "loss_before", "loss_after" (held-out, normalised squared error), "steps"}."""
    held = batches[-1:] if len(batches) > 1 else batches
    train = batches[:-1] if len(batches) > 1 else batches
    originals = {name: get_attr_value(gm, name) for name in region.weights}
    masters = {name: w.detach().float().clone().requires_grad_(True) for name, w in originals.items()}
    tuned = {name: t.detach().float().clone().requires_grad_(True) for name, t in extra.items()}

    prepared = {id(b): as_float({n: b[n] for n in region.inputs}) for b in batches}    # once, not every step

    def loss_on(batch, weights, numbers, generator=None):
        outputs = replay(region, prepared[id(batch)], weights)
        return normalised_error(*replacement(outputs, batch, numbers, generator))

    def held_loss(weights, numbers):
        with torch.no_grad():
            return sum(float(loss_on(b, weights, numbers)) for b in held) / len(held)

    generator = torch.Generator().manual_seed(seed)
    before = held_loss(masters, tuned)
    groups = [{"params": [w], "lr": lr * float(w.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
              for w in masters.values()]
    if tuned:
        groups.append({"params": list(tuned.values()), "lr": extra_lr})
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    with torch.enable_grad(), reusing_heap():
        for step in range(steps):
            for group, rate in zip(opt.param_groups, base):
                group["lr"] = rate * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = loss_on(train[step % len(train)], masters, tuned, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    after = held_loss(masters, tuned)
    kept = math.isfinite(after) and after < before
    return {"weights": {name: masters[name].detach().to(originals[name].dtype) for name in masters} if kept
            else None,
            "extra": {name: t.detach() for name, t in tuned.items()} if kept else dict(extra),
            "loss_before": before, "loss_after": after if kept else before, "steps": steps}
