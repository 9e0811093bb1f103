"""Switch, weight, index and hot-swap LoRA adapters in a rewritten program without re-exporting it.

Works on an ExportedProgram (its graph module is edited in place: modules made by `program.module()` afterwards
see the change, and `torch.export.save` keeps it) or on a module (`program.module()`, a loaded .pt2's module, the
pass manager's working GraphModule).

    set_adapters(p, ["a", "b"], weights=[1.0, 0.5])   gates of switchable layers (rewrite.multi_lora_linear):
                                                       the listed adapters active with these weights, others off
    set_adapter_index(p, ["a", None, "b", "a"])        mixed-adapter batch: row i uses the adapter named (None or −1:
                                                       none); needs `lora-batch`; empty (None) = back to the gates
    with adapter_index(p, rows): module(x)             the same, reset on exit
    hotswap(p, "a", "path/to/peft_adapter")            replace adapter a's weights in place (a new scale folded
                                                       into B): same layers and shapes (PEFT's hotswap_adapter)

Gates, scales and names are constants of the op nodes; the row index is the program's `lora_index` buffer, whose
tensor is shared by the program and every module made from it (its storage is replaced in place).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import fx

from .adapters import DEFAULT, INDEX_BUFFER, check_name
from .errors import UserError

_NAMES, _SCALES, _GATES, _IDS = 7, 8, 9, 10


def _graph_module(target) -> fx.GraphModule:
    if isinstance(target, torch.export.ExportedProgram):
        return target.graph_module
    if isinstance(target, fx.GraphModule):
        return target
    raise UserError(f"expected a rewritten program (ExportedProgram) or its module, got {type(target).__name__}")


def _kind(node: fx.Node) -> str | None:
    """"fixed" / "multi" for LoRA ops — rewrite:: ones and their kernel twins (rewrite_triton::, same leading
    arguments) in lowered programs — else None."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return None
    ns, _, op = schema.name.partition("::")
    if ns in ("rewrite", "rewrite_triton"):
        return {"lora_linear": "fixed", "multi_lora_linear": "multi"}.get(op)
    return None


def _ops(gm: fx.GraphModule):
    return [n for n in gm.graph.nodes if _kind(n) is not None]


def _set_arg(node: fx.Node, i: int, value) -> None:
    args = list(node.args)
    args[i] = value
    node.args = tuple(args)


def adapter_table(target) -> dict[str, dict]:
    """{name: {"layers": count, "gate": float | None (mixed), "id": int}} of the program's unmerged adapters."""
    table: dict[str, dict] = {}
    for node in _ops(_graph_module(target)):
        if _kind(node) == "fixed":
            entries = [(DEFAULT, 1.0, -1)]
        else:
            names = node.args[_NAMES].split(",") if node.args[_NAMES] else []
            entries = list(zip(names, node.args[_GATES], node.args[_IDS]))
        for name, gate, id_ in entries:
            row = table.setdefault(name, {"layers": 0, "gate": float(gate), "id": int(id_), "fixed": 0})
            row["layers"] += 1
            row["fixed"] += _kind(node) == "fixed"
            if row["gate"] != float(gate):
                row["gate"] = None
    return table


def _selection(names, weights) -> dict[str, float]:
    if names is None:
        names = []
    if isinstance(names, str):
        from .adapters import parse_adapter_list
        pairs = parse_adapter_list(names, weights=True) if names.strip().lower() not in ("", "none") else []
        chosen = dict(pairs)
    else:
        names = list(names)
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(names):
            raise UserError(f"set_adapters: {len(names)} names but {len(weights)} weights")
        chosen = {check_name(n): w for n, w in zip(names, weights)}
    return chosen


def set_adapters(target, names: Iterable[str] | str | None, weights: Iterable[float] | None = None) -> dict:
    """Make exactly the named adapters active (with these weights; 1 by default); returns {name: gate}.

    A layer in the fixed form (rewrite.lora_linear: `lora` without a name) holds one always-on adapter: it can stay
    as it is (default selected with weight 1), otherwise the call fails — insert with `lora{name=…}` or run
    `lora-select` (which rewrites those layers) first."""
    gm = _graph_module(target)
    chosen = _selection(names, weights)
    table = adapter_table(gm)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise UserError(f"no adapter named {', '.join(map(repr, unknown))} in the program "
                        f"(it has {', '.join(sorted(table)) or 'none'})")
    if table.get(DEFAULT, {}).get("fixed") and chosen.get(DEFAULT) != 1.0:
        raise UserError("this program's adapter \"default\" sits in the fixed form (lora without a name), which is "
                        "always on; run lora-select (or insert adapters with lora{name=...}) to make it switchable")
    for node in _ops(gm):
        if _kind(node) == "multi":
            names_ = node.args[_NAMES].split(",") if node.args[_NAMES] else []
            _set_arg(node, _GATES, [float(chosen.get(n, 0.0)) for n in names_])
    gm.recompile()
    return {n: chosen.get(n, 0.0) for n in table}


def program_ids(target) -> dict[str, int]:
    """{adapter name: batch id} of the adapters `lora-batch` numbered."""
    return {n: row["id"] for n, row in adapter_table(target).items() if row["id"] >= 0}


def _index_buffer(target) -> torch.Tensor:
    if isinstance(target, torch.export.ExportedProgram):
        buf = target.state_dict.get(INDEX_BUFFER)
        if buf is None:
            buf = target.constants.get(INDEX_BUFFER)
    else:
        buf = getattr(target, INDEX_BUFFER, None)
    if not isinstance(buf, torch.Tensor):
        raise UserError("the program has no adapter row index: run lora-batch{adapters=...} first")
    return buf


def set_adapter_index(target, rows) -> torch.Tensor:
    """Row i of the next calls' batches uses adapter rows[i] (a name, a batch id, or None/−1 for none);
    rows None or empty switches back to the gates. Returns the index tensor."""
    buf = _index_buffer(target)
    if rows is None:
        values = torch.zeros(0, dtype=torch.int64)
    elif isinstance(rows, torch.Tensor):
        values = rows.to(torch.int64).reshape(-1)
    else:
        ids = program_ids(target)
        values = []
        for r in rows:
            if r is None:
                values.append(-1)
            elif isinstance(r, str):
                if r not in ids:
                    raise UserError(f"adapter {r!r} has no batch id (lora-batch numbered {', '.join(ids) or 'none'})")
                values.append(ids[r])
            else:
                values.append(int(r))
        values = torch.tensor(values, dtype=torch.int64)
    with torch.no_grad():   # the same tensor object, new storage: every module sharing the buffer sees it
        buf.set_(values.to(buf.device).clone())
    return buf


@contextlib.contextmanager
def adapter_index(target, rows):
    """`with adapter_index(program, ["a", "b"]): module(x)` — the row index for the block, then none again."""
    set_adapter_index(target, rows)
    try:
        yield
    finally:
        set_adapter_index(target, None)


def _state(target) -> dict[str, torch.Tensor]:
    if isinstance(target, torch.export.ExportedProgram):
        return {**target.state_dict, **target.constants}
    return dict(target.named_parameters()) | dict(target.named_buffers())


def _tensor_names(target, node: fx.Node) -> dict[str, dict[str, str]]:
    """{adapter name: {"A": state name, "B": …, "magnitude": …?}} for one op node (lifted or unlifted graph)."""
    if isinstance(target, torch.export.ExportedProgram):
        sig = target.graph_signature
        lookup = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        state = lambda n: lookup[n.name]  # noqa: E731
    else:
        state = lambda n: n.target  # noqa: E731
    if _kind(node) == "fixed":
        return {DEFAULT: {"A": state(node.args[3]), "B": state(node.args[4])}}
    names = node.args[_NAMES].split(",") if node.args[_NAMES] else []
    out = {}
    for k, name in enumerate(names):
        entry = {"A": state(node.args[4][k]), "B": state(node.args[5][k])}
        if node.args[11][k] >= 0:
            entry["magnitude"] = state(node.args[6][node.args[11][k]])
        out[name] = entry
    return out


def _scale_of(node: fx.Node, name: str) -> float:
    if _kind(node) == "fixed":
        return float(node.args[5])
    return float(node.args[_SCALES][node.args[_NAMES].split(",").index(name)])


def _set_scale(node: fx.Node, name: str, scale: float) -> None:
    if _kind(node) == "fixed":
        _set_arg(node, 5, scale)
    else:
        scales = list(node.args[_SCALES])
        scales[node.args[_NAMES].split(",").index(name)] = scale
        _set_arg(node, _SCALES, scales)


def hotswap(target, name: str, folder: str, *, in_place: bool = True) -> list[str]:
    """Replace adapter `name`'s weights, magnitudes and scales by those of the PEFT folder (the program keeps its
    graph and shapes); returns the layers swapped. Every layer holding the adapter must be in the folder with the
    same shapes, and the folder must name no other layer. The graph is not touched: a new scale s' is folded into
    B (stored B = B'·s'/s, the product the layer computes is s'·B'·A' up to one rounding), so modules made earlier
    — compiled ones included — see the whole swap. in_place: copy into the existing tensors (every module sharing
    them sees it); False (a GraphModule only): store new tensors (a pass's change record)."""
    from .peft_interop import match_layer, read_adapter
    loaded = read_adapter(folder)
    gm = _graph_module(target)
    state = _state(target)
    plan = []
    for node in _ops(gm):
        tensors = _tensor_names(target, node).get(name)
        if tensors is None:
            continue
        layer = tensors["A"].rsplit(".", 1)[0]
        path = match_layer(loaded, layer)
        if path is None:
            raise UserError(f"{folder} has no weights for layer {layer}, which holds adapter {name!r}; hot-swap "
                            "needs the same layers")
        entry = loaded[path]
        for key in ("A", "B", "magnitude"):
            have, new = tensors.get(key), entry.get(key)
            if (have is None) != (new is None):
                raise UserError(f"adapter {name!r} on {layer} is {'DoRA' if have else 'plain LoRA'}, the one in "
                                f"{folder} is not: hot-swap needs the same kind")
            if have is not None and tuple(state[have].shape) != tuple(new.shape):
                raise UserError(f"lora_{key} of {layer} has shape {list(state[have].shape)} in the program and "
                                f"{list(new.shape)} in {folder}; hot-swap needs the same shapes (rank)")
        plan.append((node, layer, path, tensors, entry))
    if not plan:
        raise UserError(f"no layer holds an adapter named {name!r} (the program has "
                        f"{', '.join(sorted(adapter_table(gm))) or 'none'})")
    extra = set(loaded) - {p for _, _, p, _, _ in plan}
    if extra:
        raise UserError(f"{folder} also names {', '.join(sorted(extra)[:4])}, where adapter {name!r} is not; "
                        "hot-swap keeps the program's layers (add adapters with lora{adapter=...,name=...})")
    from . import params
    with torch.no_grad():
        for node, layer, path, tensors, entry in plan:
            old_scale = _scale_of(node, name)
            ratio = float(entry["scale"]) / old_scale if old_scale else None
            for key, state_name in tensors.items():
                old = state[state_name]
                new = entry[key].double()
                if key == "B" and ratio is not None and ratio != 1.0:
                    new = new * ratio          # the scale stays a graph constant: s_old·(B·s_new/s_old) = s_new·B
                new = new.to(dtype=old.dtype, device=old.device)
                if in_place or isinstance(target, torch.export.ExportedProgram):
                    old.copy_(new)
                else:
                    params.set_tensor(target, state_name, new.contiguous())
            if ratio is None:                  # a zero scale cannot be rescaled: set the constant
                _set_scale(node, name, float(entry["scale"]))
    gm.recompile()
    return [layer for _, layer, _, _, _ in plan]



def without_export(source, pipeline):
    """For a saved program (.pt2) and a pipeline whose every pass can apply itself to a saved program without
    touching its graph (`apply_saved(program) -> [layers]`: lora-swap), a function running it that way and
    returning a RewriteResult — no capture, no re-export; else None."""
    if not (isinstance(source, str) and source.endswith(".pt2") and pipeline
            and all(hasattr(p, "apply_saved") for p in pipeline)):
        return None

    def run():
        from .api import RewriteResult
        from .capture import load_source
        from .cost import program_params
        from .pass_manager import PassResult, Report
        program, args, kwargs = load_source(source)
        report = Report()
        for p in pipeline:
            result = PassResult(p.name, p.spec(), p.contract.value)
            result.sites = [{"site": layer, "status": "rewritten"} for layer in p.apply_saved(program)]
            result.messages.append(f"{p.name}: tensors replaced in the saved program (graph unchanged, no re-export)")
            result.params_before = result.params_after = program_params(program.module())
            report.passes.append(result)
        return RewriteResult(program, program, report, list(pipeline), tuple(args), dict(kwargs))
    return run
