"""Multiple-choice questions whose answers are phrases, each row with its own list of choices,
scored as lm-evaluation-harness scores ARC and OpenBookQA: the log-likelihood of the whole
continuation `" {choice}"` after the prompt (`acc`), and that divided by the choice's length in
characters (`acc_norm`). A new dataset of this shape is a subclass with a name and a source."""

from __future__ import annotations

import json
from typing import Any

from heft.tasks.base import Task
from heft.tasks.data import FieldError

SHARED_DATA = "../shared/data"
"""Where every developer and CI run has these datasets, relative to the working directory (the
project root under `make` and CI; elsewhere set HEFT_DATA_DIR or data.source). No hub copy has the
same rows: they are the LLM-Adapters/ReFT benchmark copies."""


class MultipleChoiceTask(Task):
    """Rows `question` (str), `choices` (list of str, or a JSON list in CSV), `label` (0-based index)."""

    fields = ("question", "choices", "label")
    label_field = "label"
    choices_field = "choices"
    template = "Question: {question}\nAnswer:"
    choice_delimiter = " "
    default_eval_split = "test"
    scoring = "continuation"
    headline = "acc_norm"
    """lm-eval's length-normalised score: the raw sum favours short answers (fewer tokens to pay for)."""

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


class ArcEasy(MultipleChoiceTask):
    """ARC-Easy (Clark et al., 2018): grade-school science questions that retrieval answers."""

    name = "arc_easy"
    default_source = f"{SHARED_DATA}/arc_easy"


class ArcChallenge(MultipleChoiceTask):
    """ARC-Challenge: the ARC questions that retrieval and co-occurrence baselines get wrong."""

    name = "arc_challenge"
    default_source = f"{SHARED_DATA}/arc_challenge"


class OpenBookQA(MultipleChoiceTask):
    """OpenBookQA (Mihaylov et al., 2018): science questions needing a fact plus common knowledge.
    lm-eval prompts it with the bare question; here it shares ARC's "Question: …\\nAnswer:" template."""

    name = "openbookqa"
    default_source = f"{SHARED_DATA}/openbookqa"
