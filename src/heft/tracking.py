"""Experiment tracking (`report_to`): TensorBoard, Weights & Biases or MLflow, through accelerate's trackers.

What a tracker receives, all on the axis of optimizer steps:

- `train/loss`, `train/learning_rate`, `train/tokens_per_s` every `log_every` steps (the loss and the
  throughput over the steps since the last point, summed over processes);
- every metrics line (`metrics.py`): evaluations as `eval/*`, stage boundaries as `boundary/*`
  (the probe loss and accuracy where a stage starts and ends) and the stage gate as `gate/*`;
- the final results as `final/*`, and the run's config as hyperparameters.

The run folder's `metrics.jsonl` and `results.json` stay the record; trackers are a view of them.
Local logs go to `<run folder>/logs`. W&B runs offline (synced later with `wandb sync`) unless the
user configured it: `WANDB_MODE` set, or an API key in `WANDB_API_KEY` or from `wandb login`.
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers

from heft.config import ConfigError, RunConfig, config_to_dict
from heft.metrics import MetricsLine

PROJECT = "heft"
"""Project (W&B), experiment (MLflow) and log subfolder (TensorBoard) of every run."""


def accelerator_options(cfg: RunConfig, run_dir: Path) -> dict:
    """`Accelerator` arguments for `cfg.report_to`; a tracker whose package is missing is refused
    here, before any training (accelerate itself would silently drop it)."""
    if not cfg.report_to:
        return {}
    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in cfg.report_to if name not in available]
    if missing:
        raise ConfigError(
            f"report_to: {', '.join(missing)} is not installed; install it (pip install {' '.join(missing)}) "
            "or remove it from report_to"
        )
    return {"log_with": list(cfg.report_to), "project_dir": str(run_dir / "logs")}


def start_tracking(accelerator: Accelerator, cfg: RunConfig, run_dir: Path) -> None:
    """Open the trackers' runs (none without `report_to`) and record the config as hyperparameters."""
    if not cfg.report_to:
        return
    init_kwargs = {"wandb": _wandb_options(run_dir), "mlflow": {"run_name": run_dir.name}}
    accelerator.init_trackers(PROJECT, config=flat_config(config_to_dict(cfg)), init_kwargs=init_kwargs)


def end_tracking(accelerator: Accelerator) -> None:
    """Close the trackers' runs (flushing their files). Not `accelerator.end_training()`, which also
    ends the process group that later runs in this process (`heft reproduce`) still use."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def _wandb_options(run_dir: Path) -> dict:
    """W&B's run in the run folder; offline unless the user has configured W&B."""
    configured = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ or _wandb_login_saved()
    return {"dir": str(run_dir / "logs"), "name": run_dir.name, **({} if configured else {"mode": "offline"})}


def _wandb_login_saved() -> bool:
    """Whether `wandb login` stored an API key (in the netrc file, where W&B keeps it)."""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def flat_config(data: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """The config as flat `a.b.c` hyperparameters: trackers take scalars only (lists and None as JSON)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flat_config(item, f"{name}.{i}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def line_scalars(line: MetricsLine) -> dict[str, float]:
    """What a metrics line shows in a tracker: numbers only, named by what they measure."""
    kind, scalars = line["kind"], {}
    if kind == "eval":
        scalars = {f"eval/{k.removeprefix('eval_')}": v for k, v in line.items() if _is_eval_number(k, v)}
        if line["train_loss"] is not None:
            scalars["train/epoch_loss"] = line["train_loss"]
    elif kind == "stage_start":
        scalars = {
            "boundary/stage": line["stage_index"],
            "boundary/loss_at_start": line.get("boundary_loss"),
            "boundary/accuracy_at_start": line.get("eval_accuracy"),
            "gate/dev_accuracy_before": line.get("dev_accuracy"),
        }
    elif kind == "stage_end":
        scalars = {"boundary/loss_at_end": line.get("boundary_loss"), "gate/dev_accuracy": line.get("dev_accuracy")}
        if "rolled_back" in line:
            scalars["gate/rolled_back"] = float(line["rolled_back"])
    return {k: float(v) for k, v in scalars.items() if v is not None}


def _is_eval_number(key: str, value: object) -> bool:
    return key.startswith("eval_") and isinstance(value, (int, float)) and not isinstance(value, bool)


RESULTS = ("final_accuracy", "majority_accuracy", "zero_shot_accuracy", "mean_margin", "wall_time_s")
RESULTS += ("train_tokens", "eval_tokens", "optimizer_steps", "peak_memory_mb")
"""The numbers of `results.json` sent to trackers, under their own names."""


def results_scalars(results: dict) -> dict[str, float]:
    """The final results (`results.json`) as `final/*` numbers, each stage's boundaries among them."""
    scalars = {f"final/{key}": results[key] for key in RESULTS}
    for stage in results["stages"]:
        for key in ("loss_at_start", "loss_at_end", "accuracy_at_start", "accuracy"):
            scalars[f"final/{stage['name']}/{key}"] = stage[key]
    return {k: float(v) for k, v in scalars.items() if v is not None}


class StepLog:
    """The `train/*` points: every `every` optimizer steps, the mean loss of the micro-batches since the
    last point, the learning rate and the tokens per second, all over every process. Without
    trackers it does nothing (and every process agrees, so the reduction is never half-called)."""

    def __init__(self, accelerator: Accelerator, every: int) -> None:
        self.accelerator, self.every = accelerator, every
        self.active = bool(accelerator.trackers)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.count, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        """One micro-batch's loss and its (unpadded) tokens."""
        self.loss_sum, self.count, self.tokens = self.loss_sum + loss, self.count + 1, self.tokens + tokens

    def step(self, step: int, learning_rate: float) -> None:
        """After optimizer step `step` (of the run): log a point when one is due."""
        if not self.active or step % self.every:
            return
        local = torch.tensor([self.loss_sum, self.count, self.tokens], dtype=torch.float64)
        loss_sum, count, tokens = self.accelerator.reduce(local.to(self.accelerator.device), "sum").tolist()
        seconds = time.perf_counter() - self.start
        point = {"train/loss": loss_sum / max(count, 1), "train/learning_rate": learning_rate}
        self.accelerator.log({**point, "train/tokens_per_s": tokens / max(seconds, 1e-9)}, step=step)
        self._reset()
