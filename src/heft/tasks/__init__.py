"""Tasks: what a config's `task:` names, resolved to a `Task`.

Kinds are the code paths, one per row shape and scoring: `yes_no` (BoolQ's first-token scoring) and
`multiple_choice` (continuation scoring). Presets (boolq, arc_easy, arc_challenge, openbookqa) are
kinds with a benchmark's name and data. `task:` takes a preset, a kind with its defaults, or a mapping
of a `kind` and its options, which the kind's `Options` dataclass checks (line numbers, did-you-mean).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

from heft.config import RunConfig
from heft.config_loader import OptionError, Source, build, did_you_mean, source_of
from heft.tasks.base import EncodedExample, Example, Task, accuracy
from heft.tasks.completion import CompletionOptions, CompletionTask
from heft.tasks.data import DataError, subsample
from heft.tasks.multiple_choice import MultipleChoiceOptions, MultipleChoiceTask
from heft.tasks.presets import PRESETS
from heft.tasks.yes_no import YesNoOptions, YesNoTask

__all__ = [
    "CompletionOptions",
    "CompletionTask",
    "DataError",
    "EncodedExample",
    "Example",
    "MultipleChoiceOptions",
    "MultipleChoiceTask",
    "Task",
    "YesNoOptions",
    "YesNoTask",
    "accuracy",
    "get_task",
    "list_kinds",
    "list_tasks",
    "register_kind",
    "register_task",
    "subsample",
    "task_for",
]

_KINDS: dict[str, type[Task]] = {}
_PRESETS: dict[str, Task] = {}


def _claim(name: str, new: type[Task] | Task) -> None:
    """Refuse to give a taken name to another kind or task: no silent override."""
    existing = _KINDS.get(name) or _PRESETS.get(name)
    if existing is None or existing is new or (type(existing) is type(new) and vars(existing) == vars(new)):
        return
    holder = f"kind {existing.__name__}" if isinstance(existing, type) else type(existing).__name__
    raise ValueError(f"task name {name!r} is already registered by {holder}")


def register_kind(cls: type[Task], name: str | None = None) -> type[Task]:
    """Make `cls` available as `task: <name>` (its defaults) and `task: {kind: <name>, ...}`; the name
    defaults to `cls.kind`. Usable as a class decorator."""
    name = name or cls.kind
    _claim(name, cls)
    _KINDS[name] = cls
    return cls


def register_task(task: type[Task] | Task) -> type[Task] | Task:
    """Register a preset: a task instance (or a class, instantiated here) under its `name`; usable as
    a class decorator."""
    instance = task() if isinstance(task, type) else task
    _claim(instance.name, instance)
    _PRESETS[instance.name] = instance
    return task


def get_task(spec: str | Mapping[str, Any], src: Source | None = None) -> Task:
    """The task a config's `task:` names: a preset, a kind with its defaults, or a mapping of a `kind`
    and its options. Errors are `ConfigError`s naming `src`'s file and line, with a did-you-mean."""
    src = src or Source("the task setting")
    if isinstance(spec, str):
        if spec in _PRESETS:
            return _PRESETS[spec]
        if spec in _KINDS:
            return _KINDS[spec]()
        hint = did_you_mean(spec, list_tasks(), cutoff=0.5, lower=True)
        src.fail(f"unknown task {spec!r}", ("task",), hint=f"{hint} registered tasks: {list_tasks()}".lstrip())
    kind, options = spec.get("kind"), {k: v for k, v in spec.items() if k != "kind"}
    if kind not in _KINDS:
        hint = did_you_mean(str(kind), list_kinds(), lower=True) or f"kinds: {list_kinds()}"
        if kind in _PRESETS:
            hint = f"{kind!r} is a task, not a kind: write `task: {kind}`"
        src.fail(f"unknown kind {kind!r} for 'task.kind'", ("task", "kind"), hint=hint)
    cls = _KINDS[kind]
    if cls.Options is None:
        if options:
            src.fail(f"task kind {kind!r} takes no options", ("task", next(iter(options))))
        return cls()
    return cls(build(cls.Options, options, ("task",), src))


def task_for(cfg: RunConfig) -> Task:
    """The task of a run config, checked against its data settings before anything loads: a bad task,
    `data.template` or `data.columns` key is a `ConfigError` naming the config's file and line."""
    src = source_of(cfg)
    task = get_task(cfg.task, src)
    try:
        task.check_template(cfg.data.template)
    except OptionError as e:
        src.fail(f"bad value {reprlib.repr(cfg.data.template)} for 'data.template'", ("data", "template"), hint=str(e))
    for name in cfg.data.columns:
        if name not in task.fields:
            src.unknown_key(("data", "columns", name), task.fields)
    return task


def list_tasks() -> list[str]:
    """Names `task:` takes on its own: the presets and the kinds, sorted."""
    return sorted([*_PRESETS, *_KINDS])


def list_kinds() -> list[str]:
    """Names `task: {kind: ...}` takes, sorted."""
    return sorted(_KINDS)


KINDS: dict[str, type[Task]] = {
    "yes_no": YesNoTask,
    "multiple_choice": MultipleChoiceTask,
    "completion": CompletionTask,
}
"""The one place kinds join the registry; each kind's `Options` dataclass holds the settings a config's
`task: {kind: ..., <option>: ...}` may give."""
for _name, _kind in KINDS.items():
    register_kind(_kind, _name)
for _preset in PRESETS:
    register_task(_preset)
