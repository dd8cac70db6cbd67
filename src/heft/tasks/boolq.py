"""BoolQ (Clark et al., 2019): yes/no questions about a Wikipedia passage, prompted as in
lm-evaluation-harness."""

from __future__ import annotations

from heft.tasks.base import Task


class BoolQ(Task):
    """Label 1 is True (" yes"); long passages are shortened, never the question."""

    name = "boolq"
    fields = ("passage", "question", "answer")
    label_field = "answer"
    template = "{passage}\nQuestion: {question}?\nAnswer:"
    choices = (" no", " yes")
    aliases = {"false": 0, "true": 1}
    truncate_field = "passage"
    default_source = "google/boolq"
