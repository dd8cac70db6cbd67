"""The benchmarks heft ships, as presets of the task kinds: a name, the kind's options, and where
their data is. `task: boolq` is exactly `task: {kind: yes_no, name: boolq}` reading google/boolq."""

from __future__ import annotations

from heft.tasks.base import Task
from heft.tasks.data import HubDefault
from heft.tasks.multiple_choice import MultipleChoiceOptions, MultipleChoiceTask
from heft.tasks.yes_no import YesNoOptions, YesNoTask

SHARED_DATA = "../shared/data"
"""Where every developer and CI run has the multiple-choice datasets, relative to the working
directory (the project root under `make` and CI; elsewhere set HEFT_DATA_DIR or data.source): the
LLM-Adapters/ReFT benchmark copies. Without that folder a preset reads its hub original, whose
splits have the same number of questions, in the hub's layout."""

HUB_ANSWER = {"label": "answerKey"}
"""Where the hub's multiple-choice datasets keep the answer (choices are `{text, label}`)."""


def _multiple_choice(name: str, hub: HubDefault) -> MultipleChoiceTask:
    return MultipleChoiceTask(MultipleChoiceOptions(name=name), default_source=f"{SHARED_DATA}/{name}", hub_default=hub)


PRESETS: tuple[Task, ...] = (
    # BoolQ (Clark et al., 2019): yes/no questions about a Wikipedia passage, prompted as in lm-eval;
    # long passages are shortened, never the question.
    YesNoTask(YesNoOptions(name="boolq"), default_source="google/boolq"),
    # ARC-Easy (Clark et al., 2018): grade-school science questions that retrieval answers.
    _multiple_choice("arc_easy", HubDefault("allenai/ai2_arc", "ARC-Easy", HUB_ANSWER)),
    # ARC-Challenge: the ARC questions that retrieval and co-occurrence baselines get wrong.
    _multiple_choice("arc_challenge", HubDefault("allenai/ai2_arc", "ARC-Challenge", HUB_ANSWER)),
    # OpenBookQA (Mihaylov et al., 2018): science questions needing a fact plus common knowledge.
    # lm-eval prompts it with the bare question; here it shares ARC's "Question: …\nAnswer:" template.
    _multiple_choice(
        "openbookqa", HubDefault("allenai/openbookqa", "main", {**HUB_ANSWER, "question": "question_stem"})
    ),
)
