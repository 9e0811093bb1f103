"""Reading and writing Hugging Face PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

Keys are `base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); the scale is
lora_alpha / r (use_rslora: / √r), with per-module overrides in `alpha_pattern` / `rank_pattern`. Module paths
are matched to our layer names by dotted suffix, so a model captured through a wrapper (an extra leading
component) still finds its adapters.
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
    if config.get("use_dora"):
        raise UserError(f"{folder} is a DoRA adapter; only plain LoRA is supported")
    layers: dict[str, dict] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            continue
        layers.setdefault(match.group(1), {})[match.group(2)] = value
    out = {}
    for path, pair in layers.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"adapter for {path} in {folder} lacks lora_{'A' if 'A' not in pair else 'B'}")
        rank = pair["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out[path] = {"A": pair["A"], "B": pair["B"], "scale": float(scale),
                     "dropout": float(config.get("lora_dropout", 0.0))}
    if not out:
        raise UserError(f"no LoRA weights found in {weights_path}")
    return out


def match_layer(adapters: dict[str, dict], layer: str) -> str | None:
    """The adapter path that names `layer` (equal, or one is a dotted suffix of the other)."""
    for path in adapters:
        if path == layer or layer.endswith("." + path) or path.endswith("." + layer):
            return path
    return None


def write_adapter(module: torch.nn.Module, folder: str) -> int:
    """Write every `<layer>.lora_A/B` pair of a rewritten program (its module) as a PEFT adapter; returns count.

    Scales come from the graph (unmerged) or from `lora_merged` buffers (merged)."""
    from .save import atomic_write
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    scales = _scales(module)
    tensors, targets, alpha_pattern, ranks = {}, [], {}, []
    for name, value in named.items():
        if not name.endswith(".lora_A"):
            continue
        layer = name[: -len(".lora_A")]
        if layer not in scales:
            continue
        b = named[f"{layer}.lora_B"]
        tensors[f"{PREFIX}{layer}.lora_A.weight"] = value.detach().contiguous()
        tensors[f"{PREFIX}{layer}.lora_B.weight"] = b.detach().contiguous()
        rank = value.shape[0]
        ranks.append(rank)
        targets.append(layer)
        alpha_pattern[re.escape(layer)] = scales[layer] * rank
    if not tensors:
        raise UserError("the program has no LoRA adapters to save")
    rank = max(set(ranks), key=ranks.count)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha_pattern[re.escape(targets[0])],
              "target_modules": targets, "alpha_pattern": alpha_pattern,
              "rank_pattern": {re.escape(t): r for t, r in zip(targets, ranks) if r != rank},
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "init_lora_weights": True}
    os.makedirs(folder, exist_ok=True)
    st = _safetensors()
    atomic_write(os.path.join(folder, "adapter_model.safetensors"), lambda tmp: st.save_file(tensors, tmp))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
    atomic_write(os.path.join(folder, "adapter_config.json"), write_config)
    return len(targets)


def _scales(module: torch.nn.Module) -> dict[str, float]:
    """layer -> LoRA scale, from rewrite::lora_linear nodes and lora_merged buffers."""
    scales = {}
    for name, buf in module.named_buffers():
        if name.endswith(".lora_merged"):
            scales[name[: -len(".lora_merged")]] = float(buf[0])
    graph = getattr(module, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_function" and "lora_linear" in str(node.target):
                a_node = node.args[3]
                if getattr(a_node, "op", None) == "get_attr" and a_node.target.endswith(".lora_A"):
                    scales[a_node.target[: -len(".lora_A")]] = float(node.args[5])
    return scales
