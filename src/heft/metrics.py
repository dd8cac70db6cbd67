"""The metrics line: one JSON object per line of a run folder's `metrics.jsonl`, and what is read from it.

Three kinds of line, written in this order around each stage:

- `stage_start` (`StageStartLine`): the model as the stage receives it, its trainable part freshly
  initialised: loss on the fixed probe batches, the evaluation (copied from the line before when the
  stage starts as the identity), and for gated stages the dev accuracy it must not lower;
- `eval` (`EvalLine`): an evaluation after an epoch; the run's first is the untrained model
  (stage `zero-shot`), and with `eval_every: never` its last is the closing one (stage `final`);
- `stage_end` (`StageEndLine`): the probe loss where the stage ends and, for gated stages, the
  verdict (`GateVerdict`), which says whether the stage was rolled back.

Run folders written before `kind` existed hold evaluations only: `read_metrics` reads such lines
as `eval`, so that every reader sees one format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from heft.files import append_jsonl, atomic_write_text
from heft.stats import paired_comparison

ZERO_SHOT = "zero-shot"
"""Stage name of the evaluation of the untrained model, before the first stage (stage_index -1)."""
FINAL = "final"
"""Stage name of the closing evaluation of a run that evaluates nowhere else (`eval_every: never`)."""


class EvalFields(TypedDict):
    """An evaluation (`evaluate.evaluate`), as the `eval_*` keys of a line."""

    eval_accuracy: float
    eval_majority_accuracy: float
    eval_per_class_accuracy: list[float]
    eval_mean_margin: float
    eval_correct: str
    """"1"/"0" per evaluation example, in input order: paired comparisons between runs."""
    eval_acc: NotRequired[float]
    """Continuation tasks: accuracy by summed log-likelihood."""
    eval_acc_norm: NotRequired[float]
    """Continuation tasks: accuracy by log-likelihood per character."""
    eval_exact_match: NotRequired[float]
    """Completion tasks: greedy answers equal to the reference after normalisation."""
    eval_response_loglik: NotRequired[float]
    """Completion tasks: mean summed log-likelihood of the reference response."""
    eval_response_loglik_per_token: NotRequired[float]
    """Completion tasks: mean log-likelihood per reference response token."""


SCORES_BESIDE_ACCURACY = ("acc", "acc_norm", "exact_match", "response_loglik", "response_loglik_per_token")
"""Evaluation scores a metrics line keeps besides accuracy: multiple choice's two, completion's three."""


class GateVerdict(TypedDict):
    """The stage gate (`keep: if_better`) on the dev split: a stage that lowered it is rolled back."""

    dev_accuracy_before: float
    dev_accuracy: float
    rolled_back: bool
    rollback_reason: str | None


class _Where(TypedDict):
    """Where in the run a line was written, and the budget spent by then."""

    stage: str
    stage_index: int
    """-1 for the zero-shot evaluation."""
    epoch: int | None
    """Completed epochs of the stage (0 at its start); None for zero-shot and final."""
    step: int
    """Optimizer steps of the whole run."""
    train_loss: float | None
    """Mean training loss of the epoch just completed."""
    elapsed_s: float
    tokens_seen: int
    """Training tokens of the whole run."""


class EvalLine(_Where, EvalFields):
    kind: Literal["eval"]


class StageStartLine(_Where, total=False):
    """Also the `EvalFields` of the received model's evaluation, except with `eval_every: never`."""

    kind: Literal["stage_start"]
    boundary_loss: float | None
    """Mean loss on the first `boundary_examples` training examples (None when that is 0)."""
    eval_reused_from: str | None
    """The line whose evaluation was copied ("<stage> epoch <n>"), when the stage starts as the identity."""
    dev_accuracy: float | None
    """Gated stages: the dev accuracy of the model the stage received."""


class StageEndLine(_Where, total=False):
    """The `GateVerdict` keys are there for gated stages (`keep: if_better`) only."""

    kind: Literal["stage_end"]
    boundary_loss: float | None
    loss_before_merge: float | None
    """LoRA stages: the probe loss before finishing; equal to boundary_loss unless a merge rounded (a
    quantized base)."""
    dev_accuracy_before: float
    dev_accuracy: float
    rolled_back: bool
    rollback_reason: str | None


MetricsLine = EvalLine | StageStartLine | StageEndLine


# ------------------------------------------------------------------------------- reading, writing
def read_metrics(path: Path) -> list[MetricsLine]:
    """Every line of a `metrics.jsonl` (none when the file is missing); lines without `kind`, from
    run folders older than it, are evaluations."""
    if not path.exists():
        return []
    lines = [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
    for line in lines:
        line.setdefault("kind", "eval")
    return lines


def append_line(path: Path, line: MetricsLine) -> None:
    """Write one line at the end of `metrics.jsonl`, durably: a line that was written survives a crash."""
    append_jsonl(path, line)


def drop_unsaved(path: Path, stage: int, epoch: int) -> None:
    """Keep only the lines of epochs a checkpoint at (`stage`, completed `epoch`) holds: a crash
    between an evaluation and its checkpoint must not leave a duplicate line once the epoch is
    trained again. A stage's start (epoch 0) belongs to it only once its first epoch is saved."""
    kept = []
    for text in path.read_text().splitlines():
        entry = json.loads(text)
        if entry["stage"] == FINAL:  # the run's closing evaluation (eval_every: never) is made again
            continue
        index, line_epoch = entry["stage_index"], entry["epoch"] or 0
        done = epoch if line_epoch else epoch - 1
        if index < stage or (index == stage and line_epoch <= done):
            kept.append(text + "\n")
    atomic_write_text(path, "".join(kept))


def evaluation_fields(result: dict) -> EvalFields:
    """The `eval_*` keys of a line from `evaluate.evaluate`'s result."""
    fields: EvalFields = {
        "eval_accuracy": result["accuracy"],
        "eval_majority_accuracy": result["majority_accuracy"],
        "eval_per_class_accuracy": result["per_class_accuracy"],
        "eval_mean_margin": result["mean_margin"],
        "eval_correct": result["correct"],
    }
    for score in SCORES_BESIDE_ACCURACY:
        if score in result:
            fields[f"eval_{score}"] = result[score]  # type: ignore[literal-required]
    return fields


def copied_evaluation(line: MetricsLine) -> EvalFields:
    """The evaluation held by `line`, to copy into a line whose model computes the same function."""
    return {k: v for k, v in line.items() if k.startswith("eval_") and k != "eval_reused_from"}  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- summaries
def evaluations(lines: Sequence[MetricsLine]) -> list[EvalLine]:
    """The `eval` lines, in order."""
    return [line for line in lines if line["kind"] == "eval"]  # type: ignore[misc]


def results_summary(lines: Sequence[MetricsLine]) -> dict:
    """The evaluation part of `results.json`: the last evaluation, the majority class and zero-shot."""
    evals = evaluations(lines)
    final = evals[-1]
    return {
        "final_accuracy": final["eval_accuracy"],
        "majority_accuracy": final["eval_majority_accuracy"],
        "zero_shot_accuracy": next((m["eval_accuracy"] for m in evals if m["stage"] == ZERO_SHOT), None),
        "per_class_accuracy": final["eval_per_class_accuracy"],
        "mean_margin": final["eval_mean_margin"],
    }


def paired_summary(lines: Sequence[MetricsLine], majority_correct: str) -> dict:
    """The `paired` part of `results.json`: the final evaluation against the zero-shot one (when the
    run made it) and against the majority-class baseline, example by example on the same evaluation
    set (exact McNemar, paired bootstrap interval; `heft.stats`). Accuracies alone cannot say whether
    a gain of a few points on a few hundred examples is more than noise. A run resumed from files
    that predate per-example records has nothing to pair: an empty summary."""
    evals = evaluations(lines)
    final = evals[-1].get("eval_correct")
    if final is None:
        return {}
    zero_shot = next((m.get("eval_correct") for m in evals if m["stage"] == ZERO_SHOT), None)
    baselines = {"zero_shot": zero_shot, "majority_class": majority_correct}
    return {
        f"final_vs_{name}": paired_comparison([final], [correct]).to_dict()
        for name, correct in baselines.items()
        if correct is not None
    }


def boundary_summary(lines: Sequence[MetricsLine], index: int) -> dict:
    """Loss on the fixed probe batches and accuracy when stage `index` started and ended."""
    starts = [m for m in lines if m["stage_index"] == index and m["epoch"] == 0]
    ends = [m for m in lines if m["stage_index"] == index and m["kind"] == "stage_end"]
    end = ends[-1] if ends else {}
    # the stage's last evaluation: after an epoch, or the run's final one (eval_every: never)
    evals = [m for m in evaluations(lines) if m["stage_index"] == index]
    return {
        "loss_at_start": starts[-1].get("boundary_loss") if starts else None,
        "loss_at_end": end.get("boundary_loss"),
        "loss_before_merge": end.get("loss_before_merge"),
        "accuracy_at_start": starts[-1].get("eval_accuracy") if starts else None,
        "accuracy": evals[-1]["eval_accuracy"] if evals else None,  # at the end (results.json's key)
        "rolled_back": bool(end.get("rolled_back")),
        "rollback_reason": end.get("rollback_reason"),
    }
