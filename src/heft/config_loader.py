"""YAML → dataclasses with errors that point at the culprit: a file's line, or the `key=value` override.

General on purpose: it knows nothing of heft's schema (`heft.config`), so every layer can read a
config section through it (run configs, reproduce files, the options of a task kind) and report a
bad value as one line naming the file, line and field, with a "did you mean" for a misspelt key.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import re
import reprlib
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Key = tuple[str | int, ...]
"""A dotted field path as parts, e.g. ("stages", 0, "epochs")."""

Check = tuple[Callable[[Any], bool], str]
"""A constraint the annotations cannot express, and how to say what it expects."""

Checks = Mapping[tuple[type, str], Check]
"""Constraints keyed by (dataclass, field); None values skip them."""

NO_CHECKS: Checks = types.MappingProxyType({})


class ConfigError(ValueError):
    """A bad config, reported as one line naming the file and line (or override), field and a fix."""


class OptionError(ValueError):
    """Raised by a dataclass's `__post_init__` (or a builder of one) for a bad value of one field;
    `build` names the file and line of that field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6, lower: bool = False) -> str:
    """The closest of `choices` to a misspelt `word` as a hint, or "" when none is close."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word).lower() if lower else str(word), choices, n=1, cutoff=cutoff)
    return f"did you mean '{close[0]}'?" if close else ""


def dotted(key: Key) -> str:
    return ".".join(map(str, key)) or "(top level)"


def one_line(text: str | None) -> str:
    return " ".join((text or "").split())


@dataclass
class Source:
    """Where values came from, so errors can point at a YAML line or the override that set them."""

    name: str
    node: yaml.Node | None = None
    overrides: list[tuple[Key, str]] = field(default_factory=list)

    def where(self, key: Key) -> str:
        for okey, text in reversed(self.overrides):
            n = min(len(okey), len(key))
            if okey[:n] == key[:n]:
                return f"override '{text}'"
        return f"{self.name} line {_line(self.node, key)}" if self.node is not None else self.name

    def fail(self, problem: str, key: Key, expected: str = "", hint: str = "") -> typing.NoReturn:
        msg = f"{problem} in {self.where(key)}" + (f": expected {expected}" if expected else "")
        raise ConfigError(msg + (f"; {hint}" if hint else ""))

    def unknown_key(self, key: Key, valid: Iterable[str]) -> typing.NoReturn:
        """Refuse the last part of `key`, suggesting the closest valid one (else listing them all)."""
        valid = list(valid)
        hint = did_you_mean(str(key[-1]), valid) or "valid keys: " + ", ".join(map(str, valid))
        self.fail(f"unknown key '{dotted(key)}'", key, hint=hint)


_SOURCE_ATTRIBUTE = "_heft_config_source"


def remember_source(obj: Any, src: Source) -> None:
    """Keep on a built config where it came from, for checks that can only run later (a task name,
    checked where tasks are resolved) but must still name the file and line. Not a dataclass field:
    equality, `asdict` and the saved YAML ignore it."""
    object.__setattr__(obj, _SOURCE_ATTRIBUTE, src)


def source_of(obj: Any) -> Source:
    """Where `obj` was read from (`remember_source`); a config made in Python is named by its type."""
    return getattr(obj, _SOURCE_ATTRIBUTE, None) or Source(type(obj).__name__)


def _line(node: yaml.Node, key: Key) -> int:
    """1-based line of the deepest part of `key` present in the YAML node tree."""
    line = node.start_mark.line
    for part in key:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return line + 1


def type_name(tp: Any) -> str:
    """`list[StageConfig]` rather than `list[heft.config.StageConfig]`, for messages and docs."""
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(map(repr, typing.get_args(tp)))
    name = tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp)
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", name)


def _is_scalar(tp: Any, value: Any) -> bool:
    """`value` fits a plain annotation: None, bool, str, int (not bool), or anything for Any."""
    return (
        tp is Any
        or (tp is type(None) and value is None)
        or (tp in (bool, str) and isinstance(value, tp))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
    )


def _convert(tp: Any, value: Any, key: Key, src: Source, hint: str, checks: Checks) -> Any:
    """Check `value` against annotation `tp` (building nested dataclasses) or fail naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, src, checks)
    if origin in (types.UnionType, typing.Union):
        nested = [arg for arg in args if dataclasses.is_dataclass(arg)]
        if nested and isinstance(value, dict):  # e.g. `quantize`: its own errors name the inner key
            return build(nested[0], value, key, src, checks)
        for arg in args:
            try:
                return _convert(arg, value, key, src, hint, checks)
            except ConfigError:
                pass
    elif origin is typing.Literal and value in args:
        return value
    elif origin is list and isinstance(value, list):
        return [_convert(args[0], v, (*key, i), src, hint, checks) for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {
            _convert(args[0], k, key, src, hint, checks): _convert(args[1], v, (*key, k), src, hint, checks)
            for k, v in value.items()
        }
    elif _is_scalar(tp, value):
        return value
    elif tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # strings too: PyYAML reads `3e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    src.fail(f"bad value {reprlib.repr(value)} for '{dotted(key)}'", key, type_name(tp), hint)


def build(cls: type, value: Any, key: Key, src: Source, checks: Checks = NO_CHECKS) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and out-of-range values
    (`checks`, and `OptionError`s raised while building it)."""
    if not isinstance(value, dict):
        src.fail(f"bad value {reprlib.repr(value)} for '{dotted(key)}'", key, f"a mapping of {cls.__name__} keys")
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, v in value.items():
        if name not in names:
            src.unknown_key((*key, name), names)
        kwargs[name] = _convert(hints[name], v, (*key, name), src, "hint: " + one_line(docs.get(name)), checks)
    try:
        obj = cls(**kwargs)
    except OptionError as e:
        bad = kwargs.get(e.field, getattr(cls, e.field, None))
        src.fail(f"bad value {reprlib.repr(bad)} for '{dotted((*key, e.field))}'", (*key, e.field), hint=str(e))
    for name in names:
        check, expected = checks.get((cls, name), (None, ""))
        v = getattr(obj, name)
        if check is not None and v is not None and not check(v):
            src.fail(
                f"bad value {reprlib.repr(v)} for '{dotted((*key, name))}'",
                (*key, name),
                expected,
                "hint: " + one_line(docs.get(name)),
            )
    return obj


def apply_override(data: dict, text: str, defaults: dict, src: Source) -> None:
    """Set one dotted `key=value` in `data`, creating missing parents from `defaults`."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"bad override '{text}': expected key=value, e.g. stages.0.epochs=3")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. a prompt template such as `Q: {question}`: keep it verbatim
        value = raw
    names, parts, node = path.strip().split("."), [], data
    for i, part in enumerate(names):
        if isinstance(node, list):
            if not (part.isdecimal() and int(part) < len(node)):
                raise ConfigError(
                    f"bad index '{part}' for '{dotted(tuple(parts))}' in override '{text}': "
                    f"expected 0..{len(node) - 1} (it has {len(node)} items)"
                )
            part = int(part)
            defaults = defaults[part] if isinstance(defaults, list) and part < len(defaults) else None
        elif isinstance(node, dict):
            defaults = defaults.get(part) if isinstance(defaults, dict) else None
            if part not in node:
                node[part] = copy.deepcopy(defaults) if isinstance(defaults, (dict, list)) else {}
        else:
            raise ConfigError(
                f"bad override '{text}': '{dotted(tuple(parts))}' is {reprlib.repr(node)}, not a mapping or list"
            )
        parts.append(part)
        if i == len(names) - 1:
            node[part] = value
        node = node[part]
    src.overrides.append((tuple(parts), text))


def read_yaml(path: str | Path) -> tuple[Any, yaml.Node | None]:
    """Data and node tree of a YAML file; the nodes let errors name the line of a field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    loader = yaml.SafeLoader(text)
    try:  # compose first, so that error messages can map field paths to line numbers
        node = loader.get_single_node()
        data = {} if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        problem = one_line(getattr(e, "problem", None) or str(e))
        if (ctx := getattr(e, "context_mark", None)) and getattr(e, "context", None):
            problem += f" ({e.context} started on line {ctx.line + 1})"
        raise ConfigError(f"invalid YAML in {where}: {problem}; hint: check indentation, colons and quoting") from None
    finally:
        loader.dispose()
    return data, node


# --------------------------------------------------------------------------- documentation


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field), which Python itself discards."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        a.target.id: inspect.cleandoc(b.value.value)
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(a.target, ast.Name)
        and isinstance(b, ast.Expr)
        and isinstance(b.value, ast.Constant)
        and isinstance(b.value.value, str)
    }


def _default_text(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}()"
    if isinstance(value, list) and any(map(dataclasses.is_dataclass, value)):
        return "[" + ", ".join(map(_default_text, value)) + "]"
    if isinstance(value, str) and "\n" in value:  # one table cell: YAML's double-quoted form, escapes and all
        return json.dumps(value, ensure_ascii=False)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def render_section(cls: type, where: str) -> list[str]:
    """Markdown lines of one dataclass: its summary and a table of its keys, types, defaults and docs."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    out = [
        "",
        f"## {cls.__name__} ({where})",
        "",
        one_line((cls.__doc__ or "").split("\n\n")[0]),
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        cells = (
            f"`{f.name}`",
            f"`{type_name(hints[f.name])}`",
            f"`{_default_text(value)}`",
            one_line(docs.get(f.name)),
        )
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return out
