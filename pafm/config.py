"""Typed configs: dataclasses read from YAML, with `a.b=value` overrides from the command line.

Every tool (`pafm.train`, `pafm.eval`, ...) declares its config as nested dataclasses and calls `load_config`.
Unknown keys, wrong types and missing required values raise `ConfigError` naming the dotted key (and, for a typo,
the closest valid key), so a mistake stops the run before anything expensive starts.

Every key also declares the values it allows, beside its default: `grad_clip: float = setting(1.0, at_least(0))`, and a
section's rules that join keys are listed in its `RELATIONS`.  `@section("optim")` checks them all whenever the
dataclass is built (from a file or in code) and raises one ConfigError naming the key, the value and what is allowed:
`optim.grad_clip=-1.0: must be >= 0 (0 disables clipping)`.  A bool or Literal key is declared by its type alone;
any other key without a rule is a programming error, which `schema` (walked by the tests) reports.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin

import yaml

from pafm.files import atomic_write_text


class ConfigError(ValueError):
    """A config file or override that does not fit the config's schema."""


# --- the values each key allows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Allowed:
    """The values one config key accepts: `test(value)` says whether a value is one, `text` says which in words."""
    test: Callable[[Any], bool]
    text: str


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _why(text: str, why: str) -> str:
    return f"{text} ({why})" if why else text


INTEGER = Allowed(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")


def at_least(lo, why: str = "") -> Allowed:
    return Allowed(lambda v: _finite_number(v) and v >= lo, _why(f">= {lo}", why))


def within(lo, hi, why: str = "", *, open_lo: bool = False, open_hi: bool = False) -> Allowed:
    """lo <= value <= hi; `open_lo` / `open_hi` leave out the bound."""
    def test(v):
        return _finite_number(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

    return Allowed(test, _why(f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}", why))


def each(rule: Allowed) -> Allowed:
    """A list or tuple whose every item is allowed by `rule`."""
    return Allowed(lambda v: isinstance(v, (list, tuple)) and all(rule.test(x) for x in v),
                   f"a list whose every item is {rule.text}")


def ordered_within(lo, hi, why: str = "") -> Allowed:
    """A pair (a, b) with lo <= a <= b <= hi."""
    return Allowed(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_finite_number, v))
                   and lo <= v[0] <= v[1] <= hi, _why(f"a pair [a, b] with {lo} <= a <= b <= {hi}", why))


def words(what: str) -> Allowed:
    """A non-empty string; `what` says what it names."""
    return Allowed(lambda v: isinstance(v, str) and v.strip() != "", f"a non-empty string: {what}")


def setting(default=dataclasses.MISSING, allowed: Allowed | None = None, *, factory=dataclasses.MISSING):
    """A config key: its default (or `factory`) and the values it allows."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"allowed": allowed})


@dataclass(frozen=True)
class Relation:
    """A rule joining keys of one section, reported on `key`; `text` may show the section's values ({lr})."""
    key: str
    test: Callable[[Any], bool]  # of the whole section
    text: str


def section(name: str):
    """`@section("optim")` in place of `@dataclass`: a config section whose every key is checked whenever it is
    built.  `name` is the section's dotted key ("" for the top level); its `RELATIONS` join its keys."""

    def make(cls):
        own_post_init = cls.__dict__.get("__post_init__")

        def __post_init__(self):
            check_section(self)
            if own_post_init is not None:
                own_post_init(self)

        cls.__config_section__ = name
        cls.__post_init__ = __post_init__
        return dataclass(cls)

    return make


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _optional(tp) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def non_null(tp):
    """Optional[X] -> X."""
    if _optional(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Union[tuple(args)]
    return tp


def _allowed(field: dataclasses.Field, tp, key: str) -> Allowed:
    """What `key` allows: its declared rule, and the choices of a bool or Literal type."""
    declared = field.metadata.get("allowed")
    tp = non_null(tp)
    if tp is bool:
        by_type = Allowed(lambda v: isinstance(v, bool), "true or false")
    elif get_origin(tp) is Literal:
        choices = get_args(tp)
        by_type = Allowed(lambda v: v in choices, f"one of {list(choices)}")
    elif declared is None:
        raise TypeError(f"config key {key} declares no allowed values: define it with setting(default, allowed)")
    else:
        return declared
    if declared is None:
        return by_type
    return Allowed(lambda v: by_type.test(v) and declared.test(v), declared.text)


def show(value) -> str:
    """A config value as it is written in YAML or an override."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(show, value)) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_section(cfg) -> None:
    """Raise ConfigError for the first key of the section `cfg` whose value is not allowed, then for its RELATIONS."""
    cls = type(cfg)
    prefix, hints = cls.__config_section__, _hints(cls)
    for field in dataclasses.fields(cfg):
        tp, value = hints[field.name], getattr(cfg, field.name)
        if dataclasses.is_dataclass(non_null(tp)) or (value is None and _optional(tp)):
            continue  # a section is checked when it is built
        key = _dotted(prefix, field.name)
        allowed = _allowed(field, tp, key)
        if not allowed.test(value):
            raise ConfigError(refusal(key, value, allowed.text))
    for relation in getattr(cls, "RELATIONS", ()):
        if not relation.test(cfg):
            key = _dotted(prefix, relation.key)
            text = relation.text.format(**{f.name: show(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})
            raise ConfigError(refusal(key, getattr(cfg, relation.key), text))


def refusal(key: str, value, text: str) -> str:
    """`optim.lr=nan: must be a finite number in (0, 1]`: the one line that refuses a value."""
    if isinstance(value, float) and not math.isfinite(value) and not text.startswith("a finite number"):
        text = f"a finite number {text}"
    return f"{key}={show(value)}: must be {text}"


@dataclass(frozen=True)
class Key:
    """One key of a config schema."""
    name: str  # dotted
    type: Any
    allowed: Allowed
    default: Any  # dataclasses.MISSING for a required key


def schema(cls, prefix: str = "") -> list[Key]:
    """Every key below the config class `cls`, with what it allows.  Raises TypeError for a section not declared
    with @section(its dotted key) or a key without a declared rule."""
    if getattr(cls, "__config_section__", None) != prefix:
        raise TypeError(f"config section {prefix or 'at the top level'} ({cls.__name__}) must be declared with "
                        f"@section({prefix!r})")
    keys = []
    for field in dataclasses.fields(cls):
        tp, key = _hints(cls)[field.name], _dotted(prefix, field.name)
        if dataclasses.is_dataclass(non_null(tp)):
            keys += schema(non_null(tp), key)
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        keys.append(Key(key, tp, _allowed(field, tp, key), default))
    return keys


def parse_overrides(overrides: list[str]) -> dict:
    """["train.steps=10", "objective.kind=fm"] -> {"train": {"steps": 10}, "objective": {"kind": "fm"}}.

    Values are parsed as YAML scalars or flow collections, so `a=1e-4`, `a=true`, `a=[1,2]` and `a=null` work.
    """
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {yaml_problem(err)}") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp` and return it converted (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string: accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build the dataclass `cls` from a nested dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (prefix + ".") if prefix else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {dotted}{close[0]}?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown config key {dotted}{key}{hint}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], dotted + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {dotted}{name}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """A dataclass config as plain YAML-able data (tuples become lists)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: where, and what."""
    mark = getattr(err, "problem_mark", None)
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    what = f"{problem} ({context})" if problem and context else problem or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{what}".split())


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Read `path` (YAML), apply `overrides` ("a.b=value"), and build `cls` strictly."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; give the YAML file in it")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} cannot be read: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = merge(data, parse_overrides(list(overrides or [])))
    return from_dict(cls, data)


def save_config(cfg, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
