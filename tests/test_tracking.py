"""`report_to`: a tiny run logs to TensorBoard through accelerate, and the event file reads back what
metrics.jsonl and results.json hold; missing trackers and W&B's offline default."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import heft.tracking as tracking
from heft.config import ConfigError, config_from_dict
from heft.train import run_training
from test_train import toy_config, write_toy_boolq


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in the event files directly in `log_dir`."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_logs_losses_evaluations_boundaries_and_results_to_tensorboard(tmp_path, tiny_model_dir):
    data = write_toy_boolq(tmp_path / "data")  # 48 examples / batch 8: 6 steps per epoch, 12 per stage
    run = tmp_path / "run"
    cfg = config_from_dict(toy_config(tiny_model_dir, data, run, report_to=["tensorboard"], log_every=4))
    results = run_training(cfg, run, show_progress=False)
    logged = scalars(run / "logs" / tracking.PROJECT)
    assert [step for step, _ in logged["train/loss"]] == list(range(4, 25, 4))
    assert all(loss > 0 for _, loss in logged["train/loss"])
    assert [step for step, _ in logged["train/tokens_per_s"]] == list(range(4, 25, 4))
    learning_rates = [lr for _, lr in logged["train/learning_rate"]]
    assert learning_rates[0] == pytest.approx(2e-2 * 9 / 12) and learning_rates[-1] == pytest.approx(2e-2 / 12)
    lines = [json.loads(text) for text in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [(m["step"], m["eval_accuracy"]) for m in lines if m["kind"] == "eval"]
    assert [(s, pytest.approx(a)) for s, a in logged["eval/accuracy"]] == evaluations
    assert evaluations[0][0] == 0, "zero-shot, before the first step"
    starts = [(m["step"], m["boundary_loss"]) for m in lines if m["kind"] == "stage_start"]
    assert (
        [(s, pytest.approx(v)) for s, v in logged["boundary/loss_at_start"]]
        == starts
        == [(0, starts[0][1]), (12, starts[1][1])]
    )
    assert logged["final/final_accuracy"] == [(24, pytest.approx(results["final_accuracy"]))]
    assert logged["final/1-loreft/accuracy"] == [(24, pytest.approx(results["stages"][1]["accuracy"]))]


def test_no_report_to_writes_no_logs(tmp_path, tiny_model_dir):
    data = write_toy_boolq(tmp_path / "data", 16, 8)
    stages = [{"method": "loreft", "epochs": 1, "reft": {"rank": 2, "positions": "f1+l1"}}]
    run_training(config_from_dict(toy_config(tiny_model_dir, data, tmp_path / "run", stages=stages)), tmp_path / "run")
    assert not (tmp_path / "run" / "logs").exists()


def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: ["tensorboard"])
    cfg = config_from_dict(toy_config(tiny_model_dir, tmp_path / "no-data", tmp_path / "run", report_to=["wandb"]))
    with pytest.raises(ConfigError, match=r"report_to: wandb is not installed; install it \(pip install wandb\)"):
        run_training(cfg, tmp_path / "run", show_progress=False)


def test_report_to_accepts_known_trackers_only():
    with pytest.raises(ConfigError, match="bad value .*'report_to'.*expected a list of tensorboard, wandb, mlflow"):
        config_from_dict({"report_to": ["tensorbord"]})
    assert config_from_dict({"report_to": ["wandb", "mlflow"]}).report_to == ["wandb", "mlflow"]
    assert config_from_dict({}).report_to == []


def test_wandb_runs_offline_unless_the_user_configured_it(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking._wandb_options(tmp_path / "run")["mode"] == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert "mode" not in tracking._wandb_options(tmp_path / "run"), "`wandb login` stored a key"
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    assert "mode" not in tracking._wandb_options(tmp_path / "run")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert "mode" not in tracking._wandb_options(tmp_path / "run")


def test_the_config_becomes_flat_scalar_hyperparameters():
    cfg = config_from_dict({"stages": [{"method": "lora"}, {"method": "loreft", "reft": {"layers": [1, 3]}}]})
    flat = tracking.flat_config(tracking.config_to_dict(cfg))
    assert flat["stages.1.reft.layers"] == "[1, 3]" and flat["stages.0.lora.r"] == cfg.stages[0].lora.r
    assert flat["max_train_examples"] == "null" and flat["report_to"] == "[]"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
