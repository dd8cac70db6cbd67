"""The metrics line: run folders written before `kind` existed read back as evaluations, and the
results and boundary summaries come out of one reader."""

from __future__ import annotations

import json

import pytest

from heft.evaluate import majority_correct
from heft.metrics import (
    append_line,
    boundary_summary,
    drop_unsaved,
    evaluations,
    paired_summary,
    read_metrics,
    results_summary,
)
from heft.tasks import EncodedExample, get_task


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


def test_paired_summary_pairs_the_final_evaluation_with_zero_shot_and_the_majority_class():
    """40 examples: the final model alone right on 18, zero-shot alone on 3 (McNemar by hand:
    2 · (1 + 21 + 210 + 1330) / 2^21); the majority baseline alone right on 2 the final model missed."""
    zero_shot = "0" * 18 + "1" * 3 + "1" * 9 + "0" * 10
    final = "1" * 18 + "0" * 3 + "1" * 9 + "0" * 10
    majority = "1" * 18 + "0" * 3 + "1" * 4 + "0" * 13 + "11"
    lines = [
        {"kind": "eval", **line(-1, None, 12 / 40, eval_correct=zero_shot)},
        {"kind": "eval", **line(1, 1, 27 / 40, eval_correct=final)},
        {"kind": "stage_end", **line(1, 1, 27 / 40, eval_correct=final), "boundary_loss": 1.0},
    ]
    paired = paired_summary(lines, majority)
    vs_zero, vs_majority = paired["final_vs_zero_shot"], paired["final_vs_majority_class"]
    assert (vs_zero["a_only"], vs_zero["b_only"], vs_zero["examples"]) == (18, 3, 40)
    assert vs_zero["difference"] == pytest.approx(15 / 40)
    assert vs_zero["p"] == pytest.approx(2 * 1562 / 2**21)
    assert vs_zero["low"] < 15 / 40 < vs_zero["high"]
    assert (vs_majority["a_only"], vs_majority["b_only"]) == (5, 2)
    assert vs_majority["difference"] == pytest.approx(3 / 40) and vs_majority["p"] > 0.4

    without_zero_shot = paired_summary(lines[1:], majority)
    assert list(without_zero_shot) == ["final_vs_majority_class"]
    old = [{k: v for k, v in m.items() if k != "eval_correct"} for m in lines]  # files before per-example records
    assert paired_summary(old, majority) == {}


def test_the_majority_baseline_is_right_where_the_gold_label_is_the_most_frequent_one():
    examples = [EncodedExample([1], 1, label, False) for label in (2, 0, 2, 1, 2, 0)]
    assert majority_correct(get_task("arc_easy"), examples) == "101010"
