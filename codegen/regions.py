"""Find fusible regions in an FX graph: maximal sets of pointwise ops (from pointwise_table) with one output,
optionally ending in one reduction over the last dim.

Growth (backwards from a sink, latest nodes first so regions are maximal):
    sink     a table op, or a last-dim reduction, not yet in a region
    absorb   producer p  when  p is a table op, p's shape = the region's iteration shape, its dtype is a float,
             and every user of p is already in the region        (so the region has one output: the sink)
repeated to a fixed point (diamonds: a value used twice inside the region joins once both users have).
Because only the sink has users outside, no path can leave the region and re-enter it; `check_acyclic` proves it
on the contracted graph with networkx before the region is replaced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from .pointwise_table import pointwise_rule, reduction_kind

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Region:
    sink: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)   # topological order, sink last
    reduce: str | None = None
    inputs: list[fx.Node] = field(default_factory=list)


def _val(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _operands_ok(node: fx.Node) -> bool:
    """Tensor operands must be float or bool tensors; other args must be plain scalars."""
    if any(isinstance(a, fx.Node) for a in node.kwargs.values()):
        return False
    for a in node.args:
        if isinstance(a, fx.Node):
            v = _val(a)
            if v is None or (v.dtype not in FLOATS and v.dtype != torch.bool):
                return False
        elif not isinstance(a, (int, float, bool, str, type(None))):
            return False
    return True


def _pointwise(node: fx.Node) -> bool:
    v = _val(node)
    return (pointwise_rule(node) is not None and v is not None and v.dtype in FLOATS and v.dim() >= 1
            and _operands_ok(node))


def find_regions(gm: fx.GraphModule, min_ops: int = 2) -> list[Region]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    taken: set[fx.Node] = set()
    regions = []
    for sink in reversed(list(gm.graph.nodes)):
        if sink in taken:
            continue
        kind = reduction_kind(sink) if sink.op == "call_function" else None
        if kind is not None:
            src = sink.args[0]
            if _val(sink) is None or _val(sink).dtype not in FLOATS or not _pointwise(src) or src in taken \
                    or len(src.users) != 1:
                continue
            members = {sink, src}
            shape = _val(src).shape
        elif _pointwise(sink):
            members = {sink}
            shape = _val(sink).shape
        else:
            continue
        changed = True
        while changed:
            changed = False
            for m in list(members):
                for p in m.all_input_nodes:
                    if p in members or p in taken or not _pointwise(p) or _val(p).shape != shape:
                        continue
                    if all(u in members for u in p.users):
                        members.add(p)
                        changed = True
        pointwise_count = len(members) - (1 if kind else 0)
        if len(members) < min_ops or pointwise_count < 1:
            continue
        nodes = sorted(members, key=order.__getitem__)
        inputs = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in members and a not in inputs:
                    inputs.append(a)
        taken |= members
        regions.append(Region(sink, nodes, kind, inputs))
    check_acyclic(gm, regions)
    return regions


def check_acyclic(gm: fx.GraphModule, regions: list[Region]) -> None:
    """Contract every region to one node and check the graph stays a DAG (else fusing would make a cycle)."""
    rep = {}
    for k, r in enumerate(regions):
        for n in r.nodes:
            rep[n] = ("region", k)
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        a = rep.get(n, n)
        g.add_node(a)
        for u in n.users:
            b = rep.get(u, u)
            if a != b:
                g.add_edge(a, b)
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise RuntimeError(f"fusing regions would create a cycle through {cycle[0][0]}")
