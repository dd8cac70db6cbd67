"""`summary.json`: per arm and seed, exact budgets and accuracies read back from the run folders."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from heft.config import RunConfig
from heft.io import versions
from heft.reproduce.plan import Plan
from heft.stats import paired_comparison
from heft.sysinfo import cpu_model_name
from heft.train import read_metrics


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def _run_summary(run_dir: Path, cfg: RunConfig) -> dict:
    """One arm and seed: accuracy per cumulative epoch (counted across stages) and exact budgets."""
    results = json.loads((run_dir / "results.json").read_text())
    every = read_metrics(run_dir / "metrics.jsonl")
    # one line per evaluated epoch (resume drops unsaved ones); folders from before `kind` hold evaluations only
    lines = {(m["stage_index"], m["epoch"]): m for m in every if m.get("kind", "eval") == "eval"}
    offsets = [0]
    for stage in cfg.stages:
        offsets.append(offsets[-1] + math.ceil(stage.epochs))
    curve, previous = [], 0
    for (index, epoch), m in lines.items():
        if index >= 0 and epoch is not None:
            curve.append(
                {
                    "epoch": offsets[index] + epoch,
                    "stage": m["stage"],
                    "method": cfg.stages[index].method,
                    "accuracy": m["eval_accuracy"],
                    "train_loss": m["train_loss"],
                    "train_tokens": m["tokens_seen"],
                    "epoch_train_tokens": m["tokens_seen"] - previous,
                    "elapsed_s": m["elapsed_s"],
                }
            )
            previous = m["tokens_seen"]
    best = max(curve, key=lambda c: c["accuracy"])  # the earliest epoch among ties
    return {
        "run_dir": str(run_dir),
        "final_accuracy": results["final_accuracy"],
        "best_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "curve": curve,
        "zero_shot_accuracy": lines[(-1, None)]["eval_accuracy"] if (-1, None) in lines else None,
        "majority_accuracy": results["majority_accuracy"],
        "train_tokens": results["train_tokens"],
        "eval_tokens": results["eval_tokens"],
        "final_correct": next(m for m in reversed(every) if m.get("kind", "eval") == "eval").get("eval_correct"),
        "received_correct": _received_correct(lines, cfg),
        "boundaries": [
            {k: s.get(k) for k in ("name", "loss_at_start", "loss_at_end", "accuracy_at_start", "accuracy")}
            for s in results["stages"]
        ],
        "evaluations": sum("eval_accuracy" in m and not m.get("eval_reused_from") for m in every),
        "optimizer_steps": results["optimizer_steps"],
        "trainable_params": [
            {k: s[k] for k in ("name", "method", "epochs", "trainable_params")} for s in results["stages"]
        ],
        "wall_time_s": results["wall_time_s"],
        "peak_memory_mb": results["peak_memory_mb"],
        "device": results.get("device"),
        "data": results["data"],
    }


def _device_label(device: dict | None) -> str:
    if not device:
        return "not recorded"  # runs from before results.json named their device
    return f"{device['type']} ({device['name']})" if device.get("name") else device["type"]


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Mean ± std over seeds at each epoch that every seed evaluated (seeds of a run resumed with
    another `eval_every` may have evaluated different epochs)."""
    by_epoch: dict[int, list[dict]] = {}
    for curve in curves:
        for point in curve:
            by_epoch.setdefault(point["epoch"], []).append(point)
    return [
        {
            "epoch": epoch,
            "accuracy": _stats([p["accuracy"] for p in points]),
            "train_tokens": statistics.fmean(p["train_tokens"] for p in points),
        }
        for epoch, points in sorted(by_epoch.items())
        if len(points) == len(curves)
    ]


def _received_correct(lines: dict, cfg: RunConfig) -> list[int] | str | None:
    """Per example, whether the model that the last stage received (the end of the stage before it)
    was right: the baseline against which that stage refines. None for one-stage runs."""
    if len(cfg.stages) < 2:
        return None
    previous = len(cfg.stages) - 2
    line = lines.get((previous, math.ceil(cfg.stages[previous].epochs)))
    return line.get("eval_correct") if line else None


def last_stage_gain(arms: dict, arm: str) -> dict | None:
    """Paired comparison of `arm`'s final evaluation with that of the model its last stage received:
    does the refinement stage improve on what the stages before it learned?"""
    runs = arms[arm]["seeds"]
    if not runs or any(r.get("received_correct") is None or r.get("final_correct") is None for r in runs.values()):
        return None
    received = f"its {arms[arm]['methods'][-2]} stage"
    return {
        "a": arm,
        "b": received,
        "seed_list": [int(s) for s in runs],
        **paired_comparison(
            [r["final_correct"] for r in runs.values()], [r["received_correct"] for r in runs.values()]
        ).to_dict(),
    }


def compare_arms(arms: dict, a: str, b: str) -> dict | None:
    """Paired comparison of the final evaluations of `a` and `b` over the seeds both finished."""
    if a not in arms or b not in arms:
        return None
    seeds = [s for s in arms[a]["seeds"] if s in arms[b]["seeds"]]
    correct = [(arms[a]["seeds"][s].get("final_correct"), arms[b]["seeds"][s].get("final_correct")) for s in seeds]
    if not seeds or any(x is None or y is None for x, y in correct):
        return None  # runs from before per-example results were recorded
    return {
        "a": a,
        "b": b,
        "seed_list": [int(s) for s in seeds],
        **paired_comparison([x for x, _ in correct], [y for _, y in correct]).to_dict(),
    }


def comparison_pairs(plan: Plan) -> list[tuple[str, str]]:
    """(arm, baseline) pairs the report compares: every arm against the first, then the config's `compare`."""
    first = next(iter(plan.configs))
    pairs = [(arm, first) for arm in plan.configs if arm != first] + [p for p in plan.compare if p[0] != p[1]]
    return list(dict.fromkeys(pairs))


def derived(arms: dict, plan: Plan) -> dict:
    """What a summary derives from its per-run records under this code and config: where the arms
    trained, the paired comparisons, what each last stage adds, the config's paper block."""
    return {
        "trained_on": sorted({label for a in arms.values() for label in a["trained_on"]}),
        "comparisons": [c for a, b in comparison_pairs(plan) if (c := compare_arms(arms, a, b)) is not None],
        "last_stage_gains": [c for arm in arms if (c := last_stage_gain(arms, arm)) is not None],
        "paper": plan.paper,
    }


def reread(previous: dict, plan: Plan) -> dict:
    """A summary rebuilt from an earlier summary.json when its run folders are gone (committed
    results): the per-run records stay as they were; what is derived from them is derived again
    under this code and `plan`'s config (its comparisons, the paper's rows)."""
    arms = previous["arms"]
    for arm in arms.values():  # summaries from before devices were recorded lack it
        arm["trained_on"] = sorted({_device_label(r.get("device")) for r in arm["seeds"].values()})
    return {**previous, **derived(arms, plan)}


def summarize(plan: Plan) -> dict:
    """Per arm and seed, mean ± std over seeds, baselines and the machine, from finished runs."""
    arms, missing, zero_shot, majority, data = {}, [], {}, {}, None
    for arm, by_seed in plan.configs.items():
        runs = {}
        for seed, cfg in by_seed.items():
            if (plan.run_dir(arm, seed) / "results.json").is_file():
                runs[seed] = run = _run_summary(plan.run_dir(arm, seed), cfg)
                majority.setdefault(seed, run["majority_accuracy"])
                data = data or run["data"]
                if run["zero_shot_accuracy"] is not None:
                    zero_shot.setdefault(seed, run["zero_shot_accuracy"])
            elif arm in plan.selected:  # arms left out with arms_only are not missing
                missing.append(f"{arm}/seed-{seed}")
        if not runs:
            continue
        stages = next(iter(by_seed.values())).stages
        arms[arm] = {
            "nominal_epochs": plan.nominal_epochs[arm],
            "epochs": [s.epochs for s in stages],
            "methods": [s.method for s in stages],
            "final_accuracy": _stats([r["final_accuracy"] for r in runs.values()]),
            "best_accuracy": _stats([r["best_accuracy"] for r in runs.values()]),
            "best_epochs": [r["best_epoch"] for r in runs.values()],
            "curve": _mean_curve([r["curve"] for r in runs.values()]),
            **{
                k: statistics.fmean(r[k] for r in runs.values())
                for k in ("train_tokens", "eval_tokens", "optimizer_steps", "wall_time_s", "peak_memory_mb")
            },
            "trainable_params": next(iter(runs.values()))["trainable_params"],
            "trained_on": sorted({_device_label(r.get("device")) for r in runs.values()}),
            "branched_from": (
                {
                    "prefix": plan.prefixes[arm].name,
                    "stages": plan.prefixes[arm].stages,
                    "run_dirs": {str(s): str(plan.prefixes[arm].run_dir(s)) for s in runs},
                }
                if arm in plan.prefixes
                else None
            ),
            "seeds": {str(s): r for s, r in runs.items()},
        }
    any_cfg = next(iter(next(iter(plan.configs.values())).values()))
    gpu = torch.cuda.is_available()
    return {
        "preset": plan.preset,
        "model": any_cfg.model,
        "task": any_cfg.task,
        "seeds": plan.seeds,
        "output_dir": str(plan.output_dir),
        "data": {
            **(data or {}),
            "max_length": any_cfg.max_length,
            "max_train_examples": any_cfg.max_train_examples,
            "max_eval_examples": any_cfg.max_eval_examples,
        },
        "majority_accuracy": _stats(list(majority.values())) if majority else None,
        "zero_shot_accuracy": _stats(list(zero_shot.values())) if zero_shot else None,
        "arms": arms,
        "missing": missing,
        **derived(arms, plan),
        "versions": versions(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": cpu_model_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if gpu else "cpu",
            "gpu": torch.cuda.get_device_name(0) if gpu else None,
        },
    }
