"""The yes_no kind: a yes/no question per row, scored as lm-evaluation-harness scores BoolQ: the
log-probabilities of the two answers' first tokens after the prompt (" no" vs " yes")."""

from __future__ import annotations

from dataclasses import dataclass, field

from heft.config_loader import OptionError
from heft.tasks.base import Task, template_fields

LABEL_FIELD = "answer"


@dataclass
class YesNoOptions:
    """Options of the yes_no kind: rows hold the template's fields and `answer` (a bool, 0/1, or one
    of the two choices or true/false as text), e.g. BoolQ's passages and questions."""

    name: str = "yes_no"
    """Label of the task in run folders and tables, and its folder under `$HEFT_DATA_DIR`."""
    template: str = "{passage}\nQuestion: {question}?\nAnswer:"
    """Prompt: a Python format string over the row's fields, which it names (not `answer`)."""
    choices: list[str] = field(default_factory=lambda: [" no", " yes"])
    """The two continuations, for label 0 (false) and label 1 (true); their first tokens must differ."""
    truncate_field: str | None = "passage"
    """Field of the template shortened (from its end) when an example exceeds `max_length`; None: too
    long is an error."""

    def __post_init__(self) -> None:
        names = template_fields(self.template, reserved=(LABEL_FIELD,))
        if len(self.choices) != 2 or len(set(self.choices)) != 2 or not all(c.strip() for c in self.choices):
            raise OptionError(
                "choices", "expected two different, non-empty continuations (false, then true), e.g. [' no', ' yes']"
            )
        if self.truncate_field is not None and self.truncate_field not in names:
            raise OptionError(
                "truncate_field", f"expected a field that the template names ({', '.join(names)}) or null"
            )


class YesNoTask(Task):
    """Label 1 is true (`choices[1]`); long rows lose the end of `truncate_field`, never the question."""

    kind = "yes_no"
    Options = YesNoOptions
    label_field = LABEL_FIELD
    aliases = {"false": 0, "true": 1}
