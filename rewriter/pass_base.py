"""The pass base class, the pass registry, and the pipeline spec language.

A pass is a frozen dataclass: its fields are its typed options, its class attributes say what it is.

    @dataclass(frozen=True)
    class LoraPass(Pass):
        '''docstring: the math and the graph before -> after'''
        name = "lora"
        contract = Contract.EXACT
        target_ops = (aten.linear.default, aten.addmm.default)   # skipped when none is in the graph
        must_follow = ()                                        # passes that must come earlier when both run
        rank: int = 8

        def run(self, ctx: PassContext) -> None: ...

Pipeline specs are shared by the CLI, Python and torch.compile:

    lora{rank=8,alpha=16,targets="attn\\..*"},lora-merge

Values are parsed by the option's annotated type (int, float, bool, str, Literal[...], optional ones);
values holding `,{}=` or spaces are quoted with '…' or "…".
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import UserError, did_you_mean


class Contract(str, enum.Enum):
    """What a pass promises about the function the program computes."""

    EXACT = "exact"              # same function up to float rounding (checked: max rel. error <= tolerance)
    APPROXIMATE = "approximate"  # close to the same function; the error is measured and reported
    SEMANTIC = "semantic"        # changes the function on purpose; the drift is reported


@dataclass(frozen=True)
class Pass:
    """Base class of every rewrite pass. Subclasses are frozen dataclasses whose fields are options."""

    name: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.EXACT
    target_ops: ClassVar[tuple] = ()     # ops (OpOverloads) this pass rewrites; none present -> skipped
    must_follow: ClassVar[tuple[str, ...]] = ()
    error_bound: ClassVar[float | None] = None  # for approximate passes: max output rel. error accepted
    summary: ClassVar[str] = ""          # one line for `rewrite passes`
    needs_teacher: ClassVar[bool] = False  # True: ctx.teacher holds the program as it was before the pipeline
    # options that keep the pass cheap on tiny random models (the fuzzer in tests/ runs every registered pass
    # with them, e.g. {"steps": 2} for a training pass); empty = the defaults are already cheap
    fuzz_options: ClassVar[dict[str, Any]] = {}
    # spec keys that differ from their field's name: {"adapter_name": "name"} lets a pass take `name=` (a field
    # cannot be called `name`, which is the pass's own)
    option_keys: ClassVar[dict[str, str]] = {}

    def should_run(self, ctx) -> str | None:
        """None when the pass has work to do, else the reason it is skipped."""
        if not self.target_ops:
            return None
        present = {n.target for n in ctx.gm.graph.nodes if n.op == "call_function"}
        if present.isdisjoint(self.target_ops):
            names = ", ".join(sorted({_op_label(t) for t in self.target_ops}))
            return f"no {names} in the graph"
        return None

    def run(self, ctx) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- options -------------------------------------------------------------------------------------------
    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """spec key -> annotated type, for every option."""
        hints = typing.get_type_hints(cls)
        return {cls.option_key(f.name): hints[f.name] for f in cls.options()}

    @classmethod
    def option_key(cls, field_name: str) -> str:
        """The key an option is written with in a spec (its field name unless `option_keys` says otherwise)."""
        return cls.option_keys.get(field_name, field_name)

    def spec(self) -> str:
        """The spec string of this pass with its non-default options: `lora{rank=4}`."""
        parts = []
        for f in self.options():
            value = getattr(self, f.name)
            if value != _default(f):
                parts.append(f"{self.option_key(f.name)}={_format_value(value)}")
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name

    def __str__(self) -> str:
        return self.spec()


def _op_label(target) -> str:
    name = getattr(target, "_schema", None)
    return name.name.replace("::", ".") if name is not None else str(target)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


# ---- registry ----------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}


def registry() -> dict[str, type[Pass]]:
    """name -> pass class, for every pass in the `passes` package (imported on first use)."""
    if not _REGISTRY:
        package = importlib.import_module("passes")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"passes.{info.name}")
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, Pass) and obj is not Pass and obj.name \
                        and obj.__module__ == module.__name__:
                    if obj.name in _REGISTRY and _REGISTRY[obj.name] is not obj:
                        raise RuntimeError(f"two passes are named {obj.name!r}")
                    _REGISTRY[obj.name] = obj
    return _REGISTRY


def get_pass_class(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        raise UserError(f'unknown pass "{name}"{did_you_mean(name, passes)}; '
                        f"available: {', '.join(sorted(passes))} (see `rewrite passes`)")
    return passes[name]


# ---- spec language -----------------------------------------------------------------------------------------
_QUOTE_NEEDED = set(",{}= '\"")


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    text = repr(value) if isinstance(value, float) else str(value)
    if value is None:
        return "none"
    if isinstance(value, str) and (not text or _QUOTE_NEEDED & set(text) or text.lower() in ("none", "true", "false")):
        quote = "'" if '"' in text else '"'
        if quote in text:
            raise UserError(f"option value {value!r} contains both quote characters; it cannot be written in a spec")
        return f"{quote}{text}{quote}"
    return text


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on `sep` outside braces and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced '}}' in pass spec {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote:
        raise UserError(f"unterminated quote in pass spec {text!r}")
    if depth:
        raise UserError(f"unbalanced '{{' in pass spec {text!r}")
    parts.append(text[start:])
    return parts


def _parse_value(pass_name: str, key: str, raw: str, annotation) -> Any:
    raw = raw.strip()
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    text = raw[1:-1] if quoted else raw
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    where = f'option "{key}" of pass "{pass_name}"'
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if type(None) in args and not quoted and text.lower() == "none":
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _parse_value(pass_name, key, raw, a)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"bad value {raw!r} for {where}")
    if origin is typing.Literal:
        if text in args:
            return text
        raise UserError(f"bad value {text!r} for {where}: expected one of {', '.join(map(str, args))}"
                        f"{did_you_mean(text, map(str, args))}")
    if annotation is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"bad value {text!r} for {where}: expected true or false")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"bad value {text!r} for {where}: expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"bad value {text!r} for {where}: expected a number") from None
    if annotation is str:
        return text
    raise UserError(f"{where} has a type ({annotation}) that cannot be set from a spec")


def parse_pass(text: str) -> Pass:
    """`lora{rank=8}` -> LoraPass(rank=8)."""
    text = text.strip()
    if not text:
        raise UserError("empty pass name in pipeline spec")
    if "{" in text:
        if not text.endswith("}"):
            raise UserError(f"pass spec {text!r} must end with '}}' after its options")
        name, body = text[: text.index("{")].strip(), text[text.index("{") + 1: -1]
    else:
        name, body = text, ""
    cls = get_pass_class(name)
    types = cls.option_types()
    values: dict[str, Any] = {}
    if body.strip():
        for item in _split_top_level(body, ","):
            if not item.strip():
                continue
            if "=" not in item:
                raise UserError(f'option "{item.strip()}" of pass "{name}" needs a value (key=value)')
            key, raw = item.split("=", 1)
            key = key.strip()
            if key not in types:
                valid = ", ".join(types) or "none"
                raise UserError(f'unknown option "{key}" for pass "{name}"{did_you_mean(key, types)}; '
                                f"valid options: {valid}")
            if key in values:
                raise UserError(f'option "{key}" given twice for pass "{name}"')
            values[key] = _parse_value(name, key, raw, types[key])
    fields = {cls.option_key(f.name): f.name for f in cls.options()}
    try:
        return cls(**{fields[k]: v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise UserError(f'bad options for pass "{name}": {e}') from None


def parse_pipeline(spec) -> list[Pass]:
    """A spec string, a Pass, or a list of either -> list of Pass objects; ordering rules checked."""
    if isinstance(spec, Pass):
        passes = [spec]
    elif isinstance(spec, str):
        if not spec.strip():
            raise UserError("empty pipeline spec; give at least one pass, e.g. --pass lora")
        passes = [parse_pass(part) for part in _split_top_level(spec, ",") if part.strip()]
    else:
        passes = []
        for item in spec:
            passes.extend(parse_pipeline(item))
    check_order(passes)
    return passes


def print_pipeline(passes: list[Pass]) -> str:
    return ",".join(p.spec() for p in passes)


def check_order(passes: list[Pass]) -> None:
    """A pass listed in another's `must_follow` must come before it when both are in the pipeline."""
    for i, p in enumerate(passes):
        for later in passes[i + 1:]:
            if later.name in p.must_follow:
                raise UserError(f'pass "{p.name}" must run after "{later.name}"; reorder the pipeline '
                                f'(e.g. "{later.name},{p.name}")')
