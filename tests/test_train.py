"""The training recipe end to end on a tiny model: run folder contents, resume after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import heft.train as train_module
from heft.config import config_from_dict
from heft.io import load_run
from heft.train import run_training

from conftest import WORDS


def write_toy_boolq(folder: Path, n_train: int = 48, n_eval: int = 24) -> Path:
    """BoolQ-layout parquet files whose answer is readable from the passage (`yes ...` / `no ...`)."""
    g = torch.Generator().manual_seed(0)
    for split, n in [("train", n_train), ("validation", n_eval)]:
        rows = []
        for i in range(n):
            answer = bool(i % 3)
            words = [WORDS[int(j)] for j in torch.randint(4, len(WORDS), (6,), generator=g)]
            rows.append({"question": " ".join(words[:3]), "passage": ("true " if answer else "false ") + " ".join(words), "answer": answer})
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


EXPECTED_LINES = [("eval", -1, None), ("stage_start", 0, 0), ("eval", 0, 1), ("eval", 0, 2), ("stage_end", 0, 2),
                  ("stage_start", 1, 0), ("eval", 1, 1), ("eval", 1, 2), ("stage_end", 1, 2)]
"""(kind, stage index, epoch) of every metrics line of `toy_config`: one line each, resumed or not."""


def line_keys(run: Path) -> list[tuple]:
    return [(m["kind"], m["stage_index"], m["epoch"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


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


def test_interrupted_run_resumes_from_last_epoch_and_matches(tmp_path, tiny_model_dir, monkeypatch):
    data = write_toy_boolq(tmp_path / "data")
    reference = run_training(config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "a")), tmp_path / "a", show_progress=False)

    calls = {"n": 0}
    original = train_module.save_run

    def crash_after_third_checkpoint(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # stage 1, epoch 1 done
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_run", crash_after_third_checkpoint)
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "b", show_progress=False)
    monkeypatch.setattr(train_module, "save_run", original)
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = run_training(cfg, tmp_path / "b", show_progress=False)
    assert line_keys(tmp_path / "b") == EXPECTED_LINES
    assert resumed["final_accuracy"] == reference["final_accuracy"]
    assert resumed["train_tokens"] == reference["train_tokens"]
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    for (name, x), (_, y) in zip(a.reft.state_dict().items(), b.reft.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name


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
    cfg = config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "run", stages=[{"method": "loreft", "epochs": 1}]))
    run_training(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(FileExistsError):
        run_training(cfg, tmp_path / "run", show_progress=False)
