"""The metrics line: run folders written before `kind` existed read back as evaluations, and the
results and boundary summaries come out of one reader."""

from __future__ import annotations

import json

from heft.metrics import append_line, boundary_summary, drop_unsaved, evaluations, read_metrics, results_summary


def line(stage_index: int, epoch: int | None, accuracy: float, **extra) -> dict:
    stage = {-1: "zero-shot", 0: "0-lora", 1: "1-loreft"}[stage_index]
    return {
        "stage": stage,
        "stage_index": stage_index,
        "epoch": epoch,
        "step": 3 * (epoch or 0),
        "train_loss": None if epoch is None else 0.5,
        "eval_accuracy": accuracy,
        "eval_majority_accuracy": 0.6,
        "eval_per_class_accuracy": [accuracy, accuracy],
        "eval_mean_margin": 0.1,
        "eval_correct": "10",
        **extra,
    }


def test_lines_without_kind_are_evaluations(tmp_path):
    """A run folder from before `kind`: evaluation lines only, and boundary losses on none of them."""
    path = tmp_path / "metrics.jsonl"
    old = [line(-1, None, 0.5), line(0, 1, 0.6), line(0, 2, 0.7), line(1, 1, 0.8)]
    path.write_text("".join(json.dumps(m) + "\n" for m in old))
    lines = read_metrics(path)
    assert [m["kind"] for m in lines] == ["eval"] * 4
    assert [m["eval_accuracy"] for m in evaluations(lines)] == [0.5, 0.6, 0.7, 0.8]
    assert results_summary(lines) == {
        "final_accuracy": 0.8,
        "majority_accuracy": 0.6,
        "zero_shot_accuracy": 0.5,
        "per_class_accuracy": [0.8, 0.8],
        "mean_margin": 0.1,
    }
    assert boundary_summary(lines, 0) == {
        "loss_at_start": None,
        "loss_at_end": None,
        "loss_before_merge": None,
        "accuracy_at_start": None,
        "accuracy": 0.7,
        "rolled_back": False,
        "rollback_reason": None,
    }


def test_boundaries_and_rollback_come_from_the_stage_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    written = [
        {"kind": "eval", **line(-1, None, 0.5)},
        {"kind": "stage_start", **line(0, 0, 0.5), "boundary_loss": 2.0, "eval_reused_from": "zero-shot epoch None"},
        {"kind": "eval", **line(0, 1, 0.7)},
        {"kind": "stage_end", **line(0, 1, 0.7), "boundary_loss": 1.0},
        {"kind": "stage_start", **line(1, 0, 0.6), "boundary_loss": 1.4, "dev_accuracy": 0.7},
        {"kind": "eval", **line(1, 1, 0.65)},
        {
            "kind": "stage_end",
            **line(1, 1, 0.65),
            "boundary_loss": 1.3,
            "rolled_back": True,
            "rollback_reason": "dev accuracy 0.6000 < 0.7000 when the stage started",
        },
    ]
    for entry in written:
        append_line(path, entry)
    lines = read_metrics(path)
    assert lines == written
    assert boundary_summary(lines, 1) == {
        "loss_at_start": 1.4,
        "loss_at_end": 1.3,
        "loss_before_merge": None,
        "accuracy_at_start": 0.6,
        "accuracy": 0.65,
        "rolled_back": True,
        "rollback_reason": "dev accuracy 0.6000 < 0.7000 when the stage started",
    }
    assert results_summary(lines)["final_accuracy"] == 0.65, "stage lines are not evaluations"


def test_drop_unsaved_keeps_what_the_checkpoint_holds(tmp_path):
    path = tmp_path / "metrics.jsonl"
    entries = [
        {"kind": "eval", **line(-1, None, 0.5)},
        {"kind": "stage_start", **line(0, 0, 0.5)},
        {"kind": "eval", **line(0, 1, 0.6)},
        {"kind": "eval", **line(0, 2, 0.7)},
    ]
    path.write_text("".join(json.dumps(m) + "\n" for m in entries))
    drop_unsaved(path, stage=0, epoch=1)  # epoch 2 was logged, its checkpoint never written
    assert [(m["stage_index"], m["epoch"]) for m in read_metrics(path)] == [(-1, None), (0, 0), (0, 1)]
    drop_unsaved(path, stage=0, epoch=0)  # no epoch of stage 0 saved: its start goes too
    assert [(m["stage_index"], m["epoch"]) for m in read_metrics(path)] == [(-1, None)]
