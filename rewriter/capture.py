"""Capture: turn what the user has into (working GraphModule, example inputs).

Sources:
    demo:NAME               a built-in demo model (rewriter.demo_models)
    FILE.pt2                an ExportedProgram saved with torch.export.save (example inputs are stored in it)
    FILE.pt                 a whole pickled nn.Module or (model, example_args) — only with trust_pickle=True,
                            since unpickling runs code; a plain state dict is refused (it has no architecture)
    pkg.module:function     a factory returning (model, example_args) or (model, example_args, example_kwargs)
    nn.Module / ExportedProgram objects (Python API)

The working IR is `ep.module()`: an unlifted GraphModule with parameters as get_attr nodes; passes rewrite
it, and `export_program` exports it once at the end.
"""
from __future__ import annotations

import importlib
import os
import re
import traceback
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import UserError, first_line

aten = torch.ops.aten
# Ops kept whole while passes run (export keeps these at its default level; listed for --decompose).
KEPT_OPS = (aten.linear.default, aten.scaled_dot_product_attention.default, aten.softmax.int)


@dataclass
class Captured:
    gm: fx.GraphModule
    args: tuple
    kwargs: dict = field(default_factory=dict)
    source: str = ""
    program: torch.export.ExportedProgram | None = None  # the program as captured (before any pass)
    dynamic: bool = False  # export with every input dim dynamic (torch.export.Dim.AUTO)
    store: object | None = None  # rewriter.lazy_weights.WeightStore when the weights are mapped from a checkpoint


def load_source(source: str, *, trust_pickle: bool = False, input_shapes: str | None = None,
                hf_options: dict | None = None):
    """source string -> (model or ExportedProgram, example_args, example_kwargs)."""
    hf = _hf_module()
    if hf is not None and hf.is_hf_source(source):
        return hf.load_hf(source, input_shape=input_shapes, **(hf_options or {}))
    if source.startswith("demo:"):
        from .demo_models import demo_model
        model, args = demo_model(source[len("demo:"):])
        return model, args, {}
    if os.path.isdir(source):
        raise UserError(f"{source} is a directory; give a .pt2/.pt file, demo:NAME or pkg.module:function")
    if source.endswith(".pt2"):
        return _load_pt2(source)
    if source.endswith((".pt", ".pth", ".bin")):
        return _load_pickle(source, trust_pickle, input_shapes)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", source):
        return _load_factory(source)
    if not os.path.exists(source):
        raise UserError(f"no such file: {source} (expected FILE.pt2, FILE.pt, demo:NAME or pkg.module:function)")
    raise UserError(f"don't know how to read {source}: use a .pt2 (torch.export.save) or .pt (whole module) file")


def _hf_module():
    try:
        from . import hf
    except ImportError:  # the Hugging Face loader is optional
        return None
    return hf


def _load_pt2(path: str):
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    from .lowering import register_backends
    register_backends()  # a lowered program calls kernel ops (rewrite_triton::) that must be registered first
    from .save import TIES_FILE, tie_weights
    extra = {TIES_FILE: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as e:  # zip/pickle/serialization errors all mean the same to the user
        raise UserError(f"{path} is not a readable torch.export program ({first_line(e)}); "
                        "re-create it with torch.export.save") from e
    tie_weights(ep, extra[TIES_FILE])
    example = getattr(ep, "example_inputs", None)
    if example is None:
        args, kwargs = _inputs_from_signature(ep)
    else:
        args, kwargs = example
    return ep, tuple(args), dict(kwargs)


def _inputs_from_signature(ep):
    """Random inputs matching the placeholders' recorded shapes and dtypes (for programs saved without examples)."""
    user_inputs = set(ep.graph_signature.user_inputs)
    args = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise UserError("the program has no stored example inputs and a non-tensor input; "
                                "save it again with torch.export.save from torch >= 2.6")
            shape = [int(s) for s in val.shape]
            args.append(torch.randn(shape, dtype=val.dtype) if val.is_floating_point()
                        else torch.zeros(shape, dtype=val.dtype))
    return tuple(args), {}


def _load_pickle(path: str, trust_pickle: bool, input_shapes: str | None):
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    if not trust_pickle:
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise UserError(f"{path} holds a pickled Python object; loading it runs code from the file. "
                                "If you trust it, pass --trust-pickle") from e
            raise UserError(f"{path} is not a readable torch file ({first_line(e)})") from e
        if isinstance(obj, dict):
            raise UserError(f"{path} is a state dict (weights only, no architecture); save the whole module "
                            "(torch.save(model)) and pass --trust-pickle, export it (torch.export.save), "
                            "or give a factory pkg.module:function")
        raise UserError(f"{path} holds a {type(obj).__name__}, not a model")
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:
        raise UserError(f"{path} could not be unpickled ({first_line(e)})") from e
    model, args, kwargs = _model_and_inputs(obj, path)
    if args is None:
        if not input_shapes:
            raise UserError(f"{path} holds a model without example inputs; give --input-shape, e.g. "
                            "--input-shape 2x16:int64")
        args = parse_input_shapes(input_shapes)
    return model, args, kwargs


def _model_and_inputs(obj, where):
    if isinstance(obj, torch.nn.Module):
        return obj, None, {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        return obj["model"], tuple(obj.get("example_args", ())) or None, dict(obj.get("example_kwargs", {}))
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.nn.Module):
        args = tuple(obj[1]) if len(obj) > 1 else None
        kwargs = dict(obj[2]) if len(obj) > 2 else {}
        return obj[0], args, kwargs
    raise UserError(f"{where} returned a {type(obj).__name__}; expected a model or (model, example_args)")


def _load_factory(spec: str):
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name} ({first_line(e)}); is it on PYTHONPATH?") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{module_name} has no function {func_name}")
    model, args, kwargs = _model_and_inputs(func(), spec)
    if args is None:
        raise UserError(f"{spec} must return (model, example_args)")
    return model, args, kwargs


def parse_input_shapes(text: str) -> tuple:
    """'2x16:int64;2x3x32x32' -> example tensors (float32 when no dtype; ints are zeros, floats randn)."""
    tensors = []
    for part in text.split(";"):
        shape_text, _, dtype_text = part.strip().partition(":")
        try:
            shape = [int(s) for s in shape_text.lower().split("x")]
        except ValueError:
            raise UserError(f"bad --input-shape {part!r}: expected e.g. 2x16:int64") from None
        dtype = getattr(torch, dtype_text or "float32", None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"bad dtype {dtype_text!r} in --input-shape; use e.g. int64, float32, bfloat16")
        gen = torch.Generator().manual_seed(0)
        tensors.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                       else torch.zeros(shape, dtype=dtype))
    return tuple(tensors)


def check_finite_parameters(named_params, store=None) -> None:
    """Refuse meta (value-less) and non-finite weights. With a weight store, each tensor's pages are handed back
    right after its check (reading a mapped checkpoint must not leave it all resident)."""
    for name, p in named_params:
        if p.is_meta:
            raise UserError(f"parameter {name} is on the meta device (shapes only, no values): load the weights "
                            f"first, e.g. model.to_empty(device='cpu') then load_state_dict(...)")
        if p.is_floating_point() and p.numel() and not _all_finite(p):
            bad = int((~torch.isfinite(p)).sum())
            raise UserError(f"parameter {name} has {bad} NaN/inf value(s); fix the weights before rewriting")
        if store is not None:
            store.release_tensor(p)


def _all_finite(t: torch.Tensor, chunk: int = 2**24) -> bool:
    """torch.isfinite(t).all() in chunks of rows: a bool temporary of a few MB, not one as big as the weight."""
    flat = t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict, *, strict: bool = False,
                 dynamic_shapes=None) -> torch.export.ExportedProgram:
    """torch.export with a one-line, actionable error when the model does not trace."""
    import contextlib
    import io
    printed = io.StringIO()  # torch prints the partial graph of a failed export to stderr; the error says enough
    try:
        with contextlib.redirect_stderr(printed):
            return torch.export.export(model, tuple(args), dict(kwargs), strict=strict,
                                       dynamic_shapes=dynamic_shapes)
    except Exception as e:
        hint = getattr(model, "export_hint", None)   # a loader that knows whose code this is (rewriter.hf)
        if hint is None:
            hint = "try without --strict" if strict else \
                "make the code traceable (no data-dependent Python control flow) or try --strict"
        raise UserError(f"the model does not export: {_export_failure(e)}; {hint}") from e


def auto_dynamic_shapes(args: tuple, kwargs: dict):
    """Dim.AUTO for every dim of every tensor input (export then keeps what can vary, specialises the rest)."""
    def spec(value):
        if isinstance(value, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(value.ndim)}
        return None
    return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())


def has_dynamic_dims(ep: torch.export.ExportedProgram) -> bool:
    return any(not getattr(sym, "is_number", True) for sym in ep.range_constraints)


def capture(source, args=None, kwargs=None, *, trust_pickle=False, strict=False, input_shapes=None,
            hf_options: dict | None = None, dynamic: bool = False) -> Captured:
    """Anything the user has -> Captured(working GraphModule, example inputs)."""
    name = source if isinstance(source, str) else type(source).__name__
    store = None       # a WeightStore when the module's weights are mapped from checkpoint shards
    checked = False
    if isinstance(source, str):
        source, loaded_args, loaded_kwargs = load_source(source, trust_pickle=trust_pickle, input_shapes=input_shapes,
                                                         hf_options=hf_options)
        args = loaded_args if args is None else args
        kwargs = loaded_kwargs if kwargs is None else kwargs
    kwargs = dict(kwargs or {})
    if isinstance(source, torch.export.ExportedProgram):
        ep = source
        if args is None:
            example = getattr(ep, "example_inputs", None)
            if example is None:
                args, kwargs = _inputs_from_signature(ep)
            else:
                args, kwargs = example
    elif isinstance(source, torch.nn.Module):
        if args is None:
            raise UserError("example inputs are needed to capture a model: rewrite(model, example_args, ...)")
        if not isinstance(args, tuple):
            args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
        from .lazy_weights import store_for
        store = store_for(source)
        check_finite_parameters(source.named_parameters(), store)
        checked = True
        was_training = source.training
        source.eval()
        try:
            ep = export_model(source, args, kwargs, strict=strict,
                              dynamic_shapes=auto_dynamic_shapes(args, kwargs) if dynamic else None)
        finally:
            source.train(was_training)
    else:
        raise UserError(f"cannot capture a {type(source).__name__}; give an nn.Module, an ExportedProgram or a path")
    gm = ep.module()
    if not checked:     # (a module's weights were checked above: the program holds the same tensors)
        check_finite_parameters(gm.named_parameters())
    if store is not None:
        store.tidy(gm)  # a --dtype other than the checkpoint's made converted copies: move them to disk
    return Captured(gm, tuple(args), dict(kwargs), name, ep, dynamic=dynamic or has_dynamic_dims(ep), store=store)


def export_program(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic: bool = False
                   ) -> torch.export.ExportedProgram:
    """Export the rewritten working module once, at the end of the pipeline."""
    try:
        return torch.export.export(gm, tuple(args), dict(kwargs), strict=False,
                                   dynamic_shapes=auto_dynamic_shapes(args, kwargs) if dynamic else None)
    except Exception as e:
        raise UserError(f"the rewritten program does not export: {_export_failure(e)} "
                        "(a pass produced something export cannot trace; run with --debug)") from e


def _export_failure(e: BaseException) -> str:
    """The first line of an export error plus the user's source line that caused it, if we can find one."""
    text = str(e)
    first = first_line(e)
    location = None
    for match in re.finditer(r'File "([^"]+)", line (\d+)', text):
        if "site-packages" not in match.group(1) and "/torch/" not in match.group(1):
            location = f"{os.path.basename(match.group(1))}:{match.group(2)}"
    if location is None:
        for frame in reversed(traceback.extract_tb(e.__traceback__)):
            if "site-packages" not in frame.filename and "/torch/" not in frame.filename \
                    and "rewriter" not in frame.filename:
                location = f"{os.path.basename(frame.filename)}:{frame.lineno}"
                break
    return f"{first} (at {location})" if location else first
