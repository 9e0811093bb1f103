"""Reading and writing Hugging Face PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

Keys are `base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r) — plus
`...lora_magnitude_vector` (out,) for DoRA (`use_dora`); the scale is lora_alpha / r (use_rslora: / √r), with
per-module overrides in `alpha_pattern` / `rank_pattern`. Module paths are matched to our layer names by dotted
suffix, so a model captured through a wrapper (an extra leading component) still finds its adapters.

One folder holds one adapter (PEFT writes its other adapters to sub-folders DIR/NAME: give that folder).
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

from .errors import UserError, first_line

PREFIX = "base_model.model."


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise UserError("reading/writing PEFT adapters needs safetensors: pip install safetensors") from None
    return st


def _pattern_value(patterns: dict, path: str, default):
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            return value
    return default


def read_adapter(folder: str) -> dict[str, dict]:
    """PEFT adapter folder -> {module path: {"A": tensor, "B": tensor, "scale": float, "dropout": float}}."""
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise UserError(f"{path} not found: a PEFT adapter folder has adapter_config.json and "
                            "adapter_model.safetensors")
    try:
        with open(config_path) as f:
            config = json.load(f)
        tensors = _safetensors().load_file(weights_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the PEFT adapter in {folder} ({first_line(e)})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA is supported")
    if config.get("lora_bias"):
        raise UserError(f"{folder} trains a bias on lora_B (lora_bias=true), which rewrite does not support")
    layers: dict[str, dict] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        dora = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", key)
        if match is not None:
            layers.setdefault(match.group(1), {})[match.group(2)] = value
        elif dora is not None:
            layers.setdefault(dora.group(1), {})["magnitude"] = value
    out = {}
    for path, pair in layers.items():
        if not {"A", "B"} <= set(pair):
            raise UserError(f"adapter for {path} in {folder} lacks lora_{'A' if 'A' not in pair else 'B'}")
        if config.get("use_dora") and "magnitude" not in pair:
            raise UserError(f"{folder} is a DoRA adapter but has no lora_magnitude_vector for {path}")
        rank = pair["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out[path] = {"A": pair["A"], "B": pair["B"], "scale": float(scale),
                     "dropout": float(config.get("lora_dropout", 0.0)),
                     "magnitude": pair.get("magnitude") if config.get("use_dora") else None}
    if not out:
        raise UserError(f"no LoRA weights found in {weights_path}")
    return out


def match_layer(adapters: dict[str, dict], layer: str) -> str | None:
    """The adapter path that names `layer` (equal, or one is a dotted suffix of the other)."""
    for path in adapters:
        if path == layer or layer.endswith("." + path) or path.endswith("." + layer):
            return path
    return None


def program_adapter_tensors(module: torch.nn.Module) -> dict[str, dict[str, dict]]:
    """{adapter name: {layer: {"A", "B", "scale", "magnitude"?, "dropout"}}} of a rewritten program's module, merged
    or not (scales from the graph, or from the merge records)."""
    from .adapters import DEFAULT, adapter_names, is_lora_node, name_from_tensor, read_layer
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    out: dict[str, dict[str, dict]] = {}

    def put(name, layer, a, b, scale, magnitude, dropout):
        entry = {"A": named[a].detach(), "B": named[b].detach(), "scale": float(scale), "dropout": float(dropout)}
        if magnitude is not None:
            entry["magnitude"] = named[magnitude].detach()
        out.setdefault(name, {})[layer] = entry

    for node in module.graph.nodes:
        if is_lora_node(node):
            layer = read_layer(node)
            for a in layer.adapters:
                put(a.name, layer.name, a.a, a.b, a.scale, a.magnitude, layer.dropout)
    for name, values in named.items():     # merged layers: `<layer>.lora_merged` / `<layer>.lora_folded<sfx>`
        layer, _, tail = name.rpartition(".")
        if not layer or not tail.startswith(("lora_merged", "lora_folded")):
            continue
        adapter_name = name_from_tensor(name, "folded") if tail.startswith("lora_folded") else DEFAULT
        own = adapter_names(f"{layer}.weight", adapter_name)
        dropout = float(values[1]) if tail == "lora_merged" else float(values[4])
        put(adapter_name, layer, own["A"], own["B"], float(values[0]),
            own["magnitude"] if own["magnitude"] in named else None, dropout)
    return out


def write_adapter(module: torch.nn.Module, folder: str, name: str | None = None) -> int:
    """Write adapter `name` of a rewritten program (its module) as a PEFT adapter folder; returns its layer count.

    Without a name, the program's only adapter. Merged programs work too (their records keep the scales)."""
    return write_payload(folder, adapter_payload(module, name))


def adapter_payload(module: torch.nn.Module, name: str | None = None) -> tuple[dict, dict]:
    """(tensors, adapter_config) of adapter `name` (see write_adapter), checked, nothing written."""
    found = program_adapter_tensors(module)
    if not found:
        raise UserError("the program has no LoRA adapters to save")
    if name is None:
        if len(found) > 1:
            raise UserError(f"the program holds adapters {', '.join(sorted(found))}: name the one to save "
                            "(--save-adapter DIR:NAME)")
        name = next(iter(found))
    if name not in found:
        raise UserError(f'the program has no adapter named "{name}"; it has {", ".join(sorted(found))}')
    layers = found[name]
    doras = {bool("magnitude" in e) for e in layers.values()}
    if len(doras) > 1:
        raise UserError(f'adapter "{name}" is DoRA on some layers only; a PEFT folder is one or the other')
    tensors, alpha_pattern, ranks = {}, {}, {}
    for layer, entry in layers.items():
        tensors[f"{PREFIX}{layer}.lora_A.weight"] = entry["A"].contiguous()
        tensors[f"{PREFIX}{layer}.lora_B.weight"] = entry["B"].contiguous()
        if "magnitude" in entry:
            tensors[f"{PREFIX}{layer}.lora_magnitude_vector"] = entry["magnitude"].contiguous()
        ranks[layer] = entry["A"].shape[0]
        alpha_pattern[re.escape(layer)] = entry["scale"] * ranks[layer]
    targets = list(layers)
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    dropout = max(e["dropout"] for e in layers.values())
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha_pattern[re.escape(targets[0])],
              "target_modules": targets, "alpha_pattern": alpha_pattern,
              "rank_pattern": {re.escape(t): r for t, r in ranks.items() if r != rank},
              "lora_dropout": dropout, "bias": "none", "use_rslora": False, "use_dora": doras == {True},
              "fan_in_fan_out": False, "init_lora_weights": True}
    return tensors, config


def write_payload(folder: str, payload: tuple[dict, dict]) -> int:
    """Write (tensors, config) as adapter_model.safetensors + adapter_config.json, each atomically."""
    from .save import atomic_write
    tensors, config = payload
    os.makedirs(folder, exist_ok=True)
    st = _safetensors()
    atomic_write(os.path.join(folder, "adapter_model.safetensors"), lambda tmp: st.save_file(tensors, tmp))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
    atomic_write(os.path.join(folder, "adapter_config.json"), write_config)
    return len(config["target_modules"])


def split_adapter_target(text: str) -> tuple[str, str | None]:
    """"DIR:NAME" -> (DIR, NAME); "DIR" -> (DIR, None). NAME must be an identifier (a path may hold colons)."""
    folder, sep, name = text.rpartition(":")
    if sep and folder and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return folder, name
    return text, None
