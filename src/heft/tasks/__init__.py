"""Task registry: a task (data + prompt + metric) is looked up by the name a config gives."""

from __future__ import annotations

import difflib

from heft.tasks.base import EncodedExample, Example, Task, accuracy
from heft.tasks.boolq import BoolQ
from heft.tasks.completion import CompletionTask
from heft.tasks.data import DataError, subsample
from heft.tasks.multiple_choice import ArcChallenge, ArcEasy, MultipleChoiceTask, OpenBookQA

__all__ = [
    "ArcChallenge",
    "ArcEasy",
    "BoolQ",
    "CompletionTask",
    "DataError",
    "EncodedExample",
    "Example",
    "MultipleChoiceTask",
    "OpenBookQA",
    "Task",
    "accuracy",
    "get_task",
    "list_tasks",
    "register_task",
    "subsample",
]

_REGISTRY: dict[str, Task] = {}


def register_task(task: type[Task] | Task) -> type[Task] | Task:
    """Register a task class (instantiated here) or instance under its `name`; usable as a class
    decorator. Registering a different task under a taken name is an error, not a silent override."""
    instance = task() if isinstance(task, type) else task
    existing = _REGISTRY.get(instance.name)
    if existing is not None and type(existing) is not type(instance):
        raise ValueError(f"task name {instance.name!r} is already registered by {type(existing).__name__}")
    _REGISTRY[instance.name] = instance
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`; an unknown name suggests the closest one."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown task {name!r}; {hint}registered tasks: {list_tasks()}")


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


for _task in (BoolQ, ArcEasy, ArcChallenge, OpenBookQA, CompletionTask):
    register_task(_task)
