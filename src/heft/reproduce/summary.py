"""`summary.json`: per arm and seed, exact budgets, accuracies and provenance read back from the run
folders; then what is derived from those records (comparisons, verdicts, provenance counts), which a
later `--report-only` derives again from the summary alone when the run folders are gone (`reread`)."""

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
from heft.files import versions
from heft.metrics import evaluations, read_metrics
from heft.reproduce.compare import compare_arms, decide_all, last_stage_gain, run_devices
from heft.reproduce.plan import Plan, Prefix
from heft.sysinfo import cpu_model_name
from heft.tasks import task_for


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def _run_summary(run_dir: Path, cfg: RunConfig) -> dict:
    """One arm and seed: accuracy per cumulative epoch (counted across stages) and exact budgets."""
    results = json.loads((run_dir / "results.json").read_text())
    every = read_metrics(run_dir / "metrics.jsonl")
    # one line per evaluated epoch (resume drops unsaved ones); folders from before `kind` hold evaluations only
    lines = {(m["stage_index"], m["epoch"]): m for m in evaluations(every)}
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
        "final_correct": evaluations(every)[-1].get("eval_correct"),
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
        "commit": results.get("commit"),
        "branched_from": results.get("branched_from"),
        "eval_set_hash": results.get("eval_set_hash"),
        "eval_example_ids": results.get("eval_example_ids"),
        "data": results["data"],
    }


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


def comparison_pairs(plan: Plan) -> list[tuple[str, str]]:
    """(arm, baseline) pairs the report compares: every arm against the first, then the config's `compare`."""
    first = next(iter(plan.configs))
    pairs = [(arm, first) for arm in plan.configs if arm != first] + [p for p in plan.compare if p[0] != p[1]]
    return list(dict.fromkeys(pairs))


def derived(summary: dict, plan: Plan) -> dict:
    """What a summary derives from its per-run records under this code and config: where the arms
    trained, the paired comparisons and their verdicts, what each last stage adds, how many pairs
    cross devices or commits, and the config's paper, selection and primary comparison."""
    arms = summary["arms"]
    for arm in arms.values():
        arm["trained_on"] = sorted({label for r in arm["seeds"].values() for label in run_devices(r)})
    comparisons = [c for a, b in comparison_pairs(plan) if (c := compare_arms(summary, a, b)) is not None]
    gains = [c for arm in arms if (c := last_stage_gain(summary, arm)) is not None]
    return {
        "trained_on": sorted({label for a in arms.values() for label in a["trained_on"]}),
        "comparisons": comparisons,
        "last_stage_gains": gains,
        "decision": decide_all(comparisons, gains, plan.primary),
        "provenance": provenance_counts(comparisons + gains),
        "paper": plan.paper,
        "selected_on": plan.selected_on,
    }


def provenance_counts(comparisons: list[dict]) -> dict:
    """How many listed comparisons pair runs across devices or commits, or runs that did not record
    them, and how many pair arms whose shared prefix the runs contradict."""
    contradicted = ("different checkpoints", "records differ")
    return {
        "comparisons": len(comparisons),
        **{
            key: sum(bool(c[f"{key}_seeds"]) for c in comparisons)
            for key in ("cross_device", "device_not_recorded", "cross_commit", "commit_not_recorded")
        },
        "prefix_contradicted": sum(
            any(v in contradicted for v in (c["prefix"] or {}).get("seeds", {}).values()) for c in comparisons
        ),
    }


def _branch_from_runs(runs: dict, prefix: Prefix | None) -> dict | None:
    """The prefix the plan branched an arm from, and per seed what its run recorded it started from
    (None for a run trained from scratch, or from before runs recorded it)."""
    recorded = {str(s): r.get("branched_from") for s, r in runs.items()}
    if prefix is None and not any(recorded.values()):
        return None
    planned = {"planned": prefix.name, "stages": prefix.stages} if prefix else {"planned": None, "stages": None}
    return {**planned, "recorded": recorded}


def reread(previous: dict, plan: Plan) -> dict:
    """A summary rebuilt from an earlier summary.json when its run folders are gone (committed
    results): the per-run records stay as they were; what is derived from them is derived again
    under this code and `plan`'s config (comparisons, verdicts, provenance flags, the paper's rows)."""
    for arm in previous["arms"].values():
        old = arm.get("branched_from")
        if old and "planned" not in old:  # written from the plan before runs recorded their branch
            arm["branched_from"] = {"planned": old["prefix"], "stages": old["stages"], "recorded": {}}
    return {**previous, **derived(previous, plan)}


def _eval_sets(arms: dict) -> dict[str, list[str]]:
    """Each recorded evaluation set's example ids, once per set (runs keep only its hash)."""
    sets = {}
    for arm in arms.values():
        for run in arm["seeds"].values():
            ids = run.pop("eval_example_ids", None)
            if ids is not None:
                sets[run["eval_set_hash"]] = ids
    return sets


def _machine() -> dict:
    """The machine that assembled the summary (each run names its own device)."""
    gpu = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if gpu else "cpu",
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
    }


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
            "branched_from": _branch_from_runs(runs, plan.prefixes.get(arm)),
            "seeds": {str(s): r for s, r in runs.items()},
        }
    any_cfg = next(iter(next(iter(plan.configs.values())).values()))
    summary = {
        "preset": plan.preset,
        "model": any_cfg.model,
        "task": task_for(any_cfg).name,  # a name also when the config's task is a mapping of a kind
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
        "eval_sets": _eval_sets(arms),
        "versions": versions(),
        "machine": _machine(),
    }
    return {**summary, **derived(summary, plan)}
