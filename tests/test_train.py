"""The training recipe end to end on a tiny model: run folder contents, resume after a crash."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import heft.train as train_module
from conftest import WORDS
from heft.config import ConfigError, config_from_dict
from heft.io import load_run
from heft.train import epoch_plan, run_training


def write_toy_boolq(folder: Path, n_train: int = 48, n_eval: int = 24) -> Path:
    """BoolQ-layout parquet files whose answer is readable from the passage (`yes ...` / `no ...`)."""
    g = torch.Generator().manual_seed(0)
    for split, n in [("train", n_train), ("validation", n_eval)]:
        rows = []
        for i in range(n):
            answer = bool(i % 3)
            words = [WORDS[int(j)] for j in torch.randint(4, len(WORDS), (6,), generator=g)]
            rows.append(
                {
                    "question": " ".join(words[:3]),
                    "passage": ("true " if answer else "false ") + " ".join(words),
                    "answer": answer,
                }
            )
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet")
    return folder


def toy_config(model_dir: Path, data_dir: Path, out: Path, **overrides) -> dict:
    return {
        "model": str(model_dir),
        "data": {"source": str(data_dir)},
        "max_length": 32,
        "batch_size": 8,
        "eval_batch_size": 8,
        "output_dir": str(out),
        "stages": [
            {"method": "lora", "epochs": 2, "lr": 2e-2, "lora": {"r": 4, "dropout": 0.0}},
            {"method": "loreft", "epochs": 2, "lr": 2e-2, "reft": {"rank": 2, "positions": "f1+l1"}},
        ],
        **overrides,
    }


EXPECTED_LINES = [
    ("eval", -1, None),
    ("stage_start", 0, 0),
    ("eval", 0, 1),
    ("eval", 0, 2),
    ("stage_end", 0, 2),
    ("stage_start", 1, 0),
    ("eval", 1, 1),
    ("eval", 1, 2),
    ("stage_end", 1, 2),
]
"""(kind, stage index, epoch) of every metrics line of `toy_config`: one line each, resumed or not."""


def line_keys(run: Path) -> list[tuple]:
    return [
        (m["kind"], m["stage_index"], m["epoch"])
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    ]


def test_run_folder_holds_metrics_results_and_loadable_model(tmp_path, tiny_model_dir):
    data = write_toy_boolq(tmp_path / "data")
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "run"))
    results = run_training(cfg, tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    every = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert line_keys(run) == EXPECTED_LINES
    assert every[1]["eval_reused_from"] == "zero-shot epoch None", "LoRA starts as the identity: no second evaluation"
    assert every[5]["eval_reused_from"] == "0-lora epoch 2", "so does an identity-initialised LoReFT stage"
    assert every[5]["boundary_loss"] == pytest.approx(every[4]["boundary_loss"], abs=1e-6)
    assert all(len(m["eval_correct"]) == 24 for m in every if m["kind"] != "stage_end")
    lines = [m for m in every if m["kind"] == "eval"]
    assert lines[-1]["tokens_seen"] == results["train_tokens"] > 0
    assert all(0 <= m["eval_accuracy"] <= 1 for m in lines)
    assert results["final_accuracy"] == lines[-1]["eval_accuracy"]
    assert [s["trainable_params"] > 0 for s in results["stages"]] == [True, True]
    assert results["optimizer_steps"] == 6 * 4  # 48 examples / batch 8 = 6 steps per epoch, 4 epochs
    assert (run / "config.yaml").is_file() and (run / "results.json").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert not manifest["checkpoint"], "the final save carries no optimizer state"
    assert not list((run / "weights").glob("*/optimizer.safetensors"))
    load_run(run)  # loads and checks hashes


def test_evaluating_every_n_epochs_leaves_training_unchanged(tmp_path, tiny_model_dir):
    data = write_toy_boolq(tmp_path / "data", 16, 8)
    three = [
        {"method": "lora", "epochs": 3, "lr": 2e-2, "lora": {"r": 4}},
        {"method": "loreft", "epochs": 3, "lr": 2e-2, "reft": {"rank": 2, "positions": "f1+l1", "dropout": 0.1}},
    ]
    runs = {}
    for every in ("epoch", 2):
        cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / str(every), stages=three, eval_every=every))
        runs[every] = run_training(cfg, tmp_path / str(every), show_progress=False)
    evaluated = [(i, e) for kind, i, e in line_keys(tmp_path / "2") if kind == "eval"]
    assert evaluated == [(-1, None), (0, 2), (0, 3), (1, 2), (1, 3)]  # every 2nd epoch and each stage's end
    assert runs[2]["final_accuracy"] == runs["epoch"]["final_accuracy"]
    a, b = load_run(tmp_path / "epoch"), load_run(tmp_path / "2")
    for (name, x), (_, y) in zip(a.reft.state_dict().items(), b.reft.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_interrupted_run_resumes_from_last_epoch_and_matches(tmp_path, tiny_model_dir, monkeypatch):
    data = write_toy_boolq(tmp_path / "data")
    # dropout in both stages: a resumed epoch must draw the same masks as an uninterrupted one
    stages = [
        {"method": "lora", "epochs": 2, "lr": 2e-2, "lora": {"r": 4, "dropout": 0.1}},
        {"method": "loreft", "epochs": 2, "lr": 2e-2, "reft": {"rank": 2, "positions": "f1+l1", "dropout": 0.1}},
    ]
    reference = run_training(
        config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "a", stages=stages)),
        tmp_path / "a",
        show_progress=False,
    )

    saves = {"n": 0}
    original = train_module.save_run

    def crash_after_third_checkpoint(*args, **kwargs):
        original(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 3:  # stage 1, epoch 1 done
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_run", crash_after_third_checkpoint)
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "b", stages=stages))
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "b", show_progress=False)
    before_crash = (tmp_path / "b" / "metrics.jsonl").read_text()
    assert not (tmp_path / "b" / "results.json").exists()

    def count_saves(*args, **kwargs):
        saves["n"] += 1
        original(*args, **kwargs)

    saves["n"] = 0
    monkeypatch.setattr(train_module, "save_run", count_saves)
    resumed = run_training(cfg, tmp_path / "b", show_progress=False)
    assert saves["n"] == 2  # only the last epoch was trained again (its checkpoint), then the final save
    assert (tmp_path / "b" / "metrics.jsonl").read_text().startswith(before_crash)  # earlier lines untouched
    assert line_keys(tmp_path / "b") == EXPECTED_LINES
    assert resumed["final_accuracy"] == reference["final_accuracy"]
    assert resumed["train_tokens"] == reference["train_tokens"]
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    for module_a, module_b in ((a.model, b.model), (a.reft, b.reft)):
        for (name, x), (name_b, y) in zip(module_a.state_dict().items(), module_b.state_dict().items(), strict=True):
            assert name == name_b and torch.allclose(x, y, atol=1e-6), name


def test_resume_drops_evaluations_the_checkpoint_does_not_hold(tmp_path, tiny_model_dir, monkeypatch):
    data = write_toy_boolq(tmp_path / "data", 16, 8)
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "run"))
    original = train_module.save_run
    calls = {"n": 0}

    def crash_before_second_checkpoint(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2 was evaluated and logged, but its checkpoint never written
            raise KeyboardInterrupt
        original(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_run", crash_before_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "run", show_progress=False)
    monkeypatch.setattr(train_module, "save_run", original)
    run_training(cfg, tmp_path / "run", show_progress=False)
    assert line_keys(tmp_path / "run") == EXPECTED_LINES


def test_finished_run_folder_is_not_overwritten(tmp_path, tiny_model_dir):
    data = write_toy_boolq(tmp_path / "data", 16, 8)
    cfg = config_from_dict(
        toy_config(tiny_model_dir, data, tmp_path / "run", stages=[{"method": "loreft", "epochs": 1}])
    )
    run_training(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(FileExistsError):
        run_training(cfg, tmp_path / "run", show_progress=False)


def test_held_out_splits_never_reach_training(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from heft.data import load_data
    from heft.tasks import get_task

    data = write_toy_boolq(tmp_path / "data", 60, 12)
    cfg = config_from_dict(
        toy_config(
            tiny_model_dir,
            data,
            tmp_path / "run",
            max_eval_examples=20,
            max_train_examples=25,
            data={"source": str(data), "eval_split": "train", "dev_examples": 9},
        )
    )
    splits = load_data(get_task("boolq"), cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert (len(splits.train), len(splits.evaluation), len(splits.dev)) == (25, 20, 9)
    as_set = lambda examples: {tuple(e.input_ids) for e in examples}  # noqa: E731
    assert not as_set(splits.train) & as_set(splits.evaluation) and not as_set(splits.train) & as_set(splits.dev)
    assert not as_set(splits.evaluation) & as_set(splits.dev)
    assert splits.info["eval_split"] == "train (held out of training)" and splits.info["dev_examples"] == 9
    assert 1 <= sum(e.label == 0 for e in splits.dev) <= 4, "stratified: a third of the toy labels are 0"


@pytest.mark.parametrize("dev_after, rolled_back", [(0.5, True), (0.75, False)])
def test_stage_gate_rolls_back_a_stage_that_lowers_dev_accuracy(
    tmp_path, tiny_model_dir, monkeypatch, dev_after, rolled_back
):
    data = write_toy_boolq(tmp_path / "data")
    stages = [
        {"method": "lora", "epochs": 1, "lr": 2e-2, "lora": {"r": 4, "dropout": 0.0}},
        {
            "method": "loreft",
            "epochs": 1,
            "lr": 2e-2,
            "keep": "if_better",
            "reft": {"rank": 2, "positions": "f1+l1", "init": "random"},
        },
    ]
    cfg = config_from_dict(
        toy_config(tiny_model_dir, data, tmp_path / "run", stages=stages, data={"source": str(data), "dev_examples": 8})
    )
    real_evaluate, dev_scores, judged = train_module.evaluate, iter([0.75, dev_after]), []

    def evaluate(model, task, examples, **options):  # the dev split (8 examples) gets scripted accuracies
        result = real_evaluate(model, task, examples, **options)
        if len(examples) != 8:
            return result
        judged.append(len(model.reft))
        return {**result, "accuracy": next(dev_scores)}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    results = run_training(cfg, tmp_path / "run", show_progress=False)
    assert judged == [0, 1], "'before' is the model the stage received, not the stage's random init"
    stage = results["stages"][1]
    assert stage["rolled_back"] is rolled_back
    assert (stage["rollback_reason"] == "dev accuracy 0.5000 < 0.7500 when the stage started") is rolled_back
    every = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lora_end = next(m for m in every if (m["kind"], m["stage_index"]) == ("eval", 0))
    final = every[-2]
    assert (
        final["eval_correct"] == lora_end["eval_correct"] and final["eval_mean_margin"] == lora_end["eval_mean_margin"]
    ) is rolled_back
    model = load_run(tmp_path / "run")
    assert model.stages[1].rolled_back is rolled_back and (len(model.reft) == 0) is rolled_back
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][1]["rolled_back"] is rolled_back


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"method": "loreft", "reft": {"rank": 999}}, "stage 1 (loreft): LoReFT rank 999 exceeds"),
        ({"method": "loreft", "reft": {"layers": [7]}}, "stage 1 (loreft): layers [7]"),
        ({"method": "lora", "lora": {"target_modules": ["qkv"]}}, "stage 1 (lora): lora.target_modules ['qkv']"),
        (
            {"method": "lora", "lora": {"layers_to_transform": [0, 9]}},
            "stage 1 (lora): lora.layers_to_transform [0, 9]: this model has layers 0..1",
        ),
    ],
)
def test_a_bad_later_stage_is_refused_before_the_first_trains(tmp_path, tiny_model_dir, monkeypatch, bad, message):
    data = write_toy_boolq(tmp_path / "data")
    stages = [{"method": "lora", "epochs": 1, "lr": 2e-2, "lora": {"r": 4}}, bad]
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "run", stages=stages))
    monkeypatch.setattr(train_module, "train_stage", lambda *a, **k: pytest.fail("trained before checking every stage"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_training(cfg, tmp_path / "run", show_progress=False)


def test_gate_without_dev_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="needs a dev split.*data.dev_examples"):
        config_from_dict({"stages": [{"method": "loreft", "keep": "if_better"}]})


def test_epoch_plan_counts_fractional_epochs_exactly():
    assert epoch_plan(100, 0.07) == [7]  # 100 * 0.07 is 7.000000000000001 in floats
    assert epoch_plan(10, 2.5) == [10, 10, 5] and epoch_plan(3, 1) == [3] and epoch_plan(3, 0.1) == [1]


def test_boundary_loss_uses_exactly_boundary_examples(tmp_path, tiny_model_dir, monkeypatch):
    data = write_toy_boolq(tmp_path / "data")
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "run", boundary_examples=10, eval_every="never"))
    probed = []
    real_mean_loss = train_module.mean_loss

    def mean_loss(model, batches, bf16):
        probed.append(sum(len(b["input_ids"]) for b in batches))
        return real_mean_loss(model, batches, bf16)

    monkeypatch.setattr(train_module, "mean_loss", mean_loss)
    run_training(cfg, tmp_path / "run", show_progress=False)
    assert probed and set(probed) == {10}, probed


def test_a_run_resumed_at_a_stage_boundary_checks_the_stages_still_to_add(tmp_path, tiny_model_dir, monkeypatch):
    """As `heft reproduce` resumes an arm branched off a shared prefix: its own stages are checked first."""
    data = write_toy_boolq(tmp_path / "data")
    lora = {"method": "lora", "epochs": 1, "lr": 2e-2, "lora": {"r": 4}}
    real_train_stage, calls = train_module.train_stage, []

    def stop_at_the_second_stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_stage(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_stage", stop_at_the_second_stage)
    cfg = config_from_dict(
        toy_config(tiny_model_dir, data, tmp_path / "run", stages=[lora, {"method": "loreft", "reft": {"rank": 2}}])
    )
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "run", show_progress=False)
    bad = config_from_dict(
        toy_config(tiny_model_dir, data, tmp_path / "run", stages=[lora, {"method": "loreft", "reft": {"rank": 999}}])
    )
    monkeypatch.setattr(
        train_module, "train_stage", lambda *a, **k: pytest.fail("trained before checking the stages to add")
    )
    with pytest.raises(ConfigError, match=re.escape("stage 1 (loreft): LoReFT rank 999 exceeds")):
        run_training(bad, tmp_path / "run", show_progress=False)


def test_a_crash_after_the_final_evaluation_leaves_one_final_line(tmp_path, tiny_model_dir, monkeypatch):
    data = write_toy_boolq(tmp_path / "data")
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "run", eval_every="never"))
    real_write_json = train_module.write_json

    def disk_full_at_results(path, data):
        if path.name == "results.json":
            raise OSError(28, "No space left on device")
        real_write_json(path, data)

    monkeypatch.setattr(train_module, "write_json", disk_full_at_results)
    with pytest.raises(OSError):
        run_training(cfg, tmp_path / "run", show_progress=False)
    monkeypatch.undo()
    run_training(cfg, tmp_path / "run", show_progress=False)
    stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("final") == 1 and stages[-1] == "final", stages
