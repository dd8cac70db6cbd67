"""The multiple_choice kind: questions whose answers are phrases, each row with its own list of
choices, scored as lm-evaluation-harness scores ARC and OpenBookQA: the log-likelihood of the whole
continuation `" {choice}"` after the prompt (`acc`), and that divided by the choice's length in
characters (`acc_norm`). A new dataset of this shape needs no code: `task: multiple_choice`, with
`data.columns` for other column names. Rows in the hub's usual layout (ai2_arc, openbookqa,
commonsense_qa: choices as `{text: [...], label: [keys]}`, the answer one of the keys) are read as
they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from heft.config_loader import OptionError
from heft.tasks.base import Example, Task, template_fields
from heft.tasks.data import FieldError

LABEL_FIELD, CHOICES_FIELD = "label", "choices"


@dataclass
class MultipleChoiceOptions:
    """Options of the multiple_choice kind: rows hold the template's fields, `choices` (a list of
    strings, or a JSON list in CSV) and `label` (the 0-based index of the right one)."""

    name: str = "multiple_choice"
    """Label of the task in run folders and tables, and its folder under `$HEFT_DATA_DIR`."""
    template: str = "Question: {question}\nAnswer:"
    """Prompt: a Python format string over the row's fields, which it names (not `choices` or `label`)."""
    choice_delimiter: str = " "
    """Text put before every choice to make its continuation (lm-eval's target delimiter)."""
    headline: Literal["acc", "acc_norm"] = "acc_norm"
    """The accuracy reported and used to judge stages: `acc_norm` (lm-eval's length-normalised
    score; the raw sum favours short answers, with fewer tokens to pay for) or `acc`."""
    truncate_field: str | None = None
    """Field of the template shortened (from its end) when an example exceeds `max_length`; None: too
    long is an error."""

    def __post_init__(self) -> None:
        names = template_fields(self.template, reserved=(LABEL_FIELD, CHOICES_FIELD))
        if self.truncate_field is not None and self.truncate_field not in names:
            raise OptionError(
                "truncate_field", f"expected a field that the template names ({', '.join(names)}) or null"
            )


class MultipleChoiceTask(Task):
    """Rows of the template's fields, `choices` and `label`; scored by continuation (see the module)."""

    kind = "multiple_choice"
    Options = MultipleChoiceOptions
    label_field = LABEL_FIELD
    choices_field = CHOICES_FIELD
    default_eval_split = "test"
    scoring = "continuation"

    def to_example(self, row: dict[str, Any], template: str | None = None) -> Example:
        return super().to_example(self._indexed(row), template)

    def _indexed(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row in the hub's layout (choices `{text: [...], label: [keys]}`, the answer a key such as "A"
        or "1", as text) with its choices as a list and its answer as their 0-based index. An answer given
        as a number stays an index (as in the list layout, and the 0 of a row to predict)."""
        value = row[self.choices_field]
        if not isinstance(value, dict):
            return row
        texts, keys = value.get("text"), value.get("label")
        if not isinstance(texts, (list, tuple)) or not isinstance(keys, (list, tuple)) or len(texts) != len(keys):
            raise FieldError(
                self.choices_field, f"expected a list, or {{text: [...], label: [...]}} of equal lengths, got {value!r}"
            )
        label = row[self.label_field]
        if isinstance(label, str):
            keys = [str(key) for key in keys]
            if label not in keys:
                raise FieldError(self.label_field, f"answer {label!r} is none of the choice labels {keys}")
            label = keys.index(label)
        return {**row, self.choices_field: list(texts), self.label_field: label}

    def row_choices(self, row: dict[str, Any]) -> list[str]:
        """The row's choices as continuations (`choice_delimiter` + choice); bad values raise `FieldError`."""
        field, value = self.choices_field, row[self.choices_field]
        if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells hold lists as JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise FieldError(field, f"invalid JSON list {value!r} ({e.msg})") from None
        if not isinstance(value, (list, tuple)):
            raise FieldError(field, f"expected a list of strings, got {type(value).__name__} {value!r}")
        if not value:
            raise FieldError(field, "empty choice list")
        if len(value) == 1:
            raise FieldError(field, f"one choice ({value[0]!r}); a question needs at least two to choose between")
        for i, choice in enumerate(value):
            if not isinstance(choice, str):
                raise FieldError(field, f"choice {i} is {type(choice).__name__} {choice!r}, expected text")
            if not choice.strip():
                raise FieldError(field, f"choice {i} is empty text")
        return [self.choice_delimiter + choice for choice in value]

    def parse_label(self, value: Any, num_choices: int | None = None) -> int:
        """A 0-based index into the row's choices, as an int or digits."""
        if isinstance(value, str) and value.strip().isdecimal():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(
                self.label_field, f"expected an integer index into the choices, got {type(value).__name__} {value!r}"
            )
        if num_choices is not None and not 0 <= value < num_choices:
            raise FieldError(
                self.label_field, f"label {value} is outside the {num_choices} choices (0..{num_choices - 1})"
            )
        return value
