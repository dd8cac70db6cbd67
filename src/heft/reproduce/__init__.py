"""`heft reproduce`: the paper's BoolQ comparison (arXiv 2509.09801) as one resumable command.

Every arm (LoRA, LoReFT, joint and HEFT at 20 and at 3 epochs) trains the same model on the same
subsample, seeds, max length and evaluation set, into `<output_dir>/<arm>/seed-<s>/`. Finished
arms are read back, interrupted ones resume (the training recipe does that). All budget numbers
come from each run's `results.json` and `metrics.jsonl`, never from estimates, and end up in
`summary.json`, `report.md`, `accuracy_vs_epoch.png` and `accuracy_vs_tokens.png`.

The zero-shot accuracy depends only on the base model and the evaluation set, so it is evaluated
once per seed, by the first arm that runs in a call, and read from whichever arm holds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import sys
from collections.abc import Sequence

from heft.files import atomic_write_text, versions, write_json
from heft.io import run_folder_lock
from heft.reproduce.jobs import auto_jobs
from heft.reproduce.plan import Plan, load_plan
from heft.reproduce.plots import plot
from heft.reproduce.report import render_report
from heft.reproduce.run import train_plan, train_plan_parallel
from heft.reproduce.summary import reread, summarize

__all__ = ["Plan", "ReproduceJobsFailed", "load_plan", "reproduce", "summarize", "render_report", "plot"]

log = logging.getLogger("heft")


class ReproduceJobsFailed(RuntimeError):
    """Some parallel jobs failed; the summary and report of the others were written."""


def _only_a_summary(plan: Plan) -> bool:
    """Whether the output folder holds a summary.json but none of the plan's finished runs: results
    committed without their run folders, which a report-only call re-reads."""
    finished = any((plan.run_dir(arm, seed) / "results.json").is_file() for arm in plan.configs for seed in plan.seeds)
    return not finished and (plan.output_dir / "summary.json").is_file()


def reproduce(
    config_path: str,
    overrides: Sequence[str] = (),
    output_dir: str | None = None,
    show_progress: bool = True,
    train: bool = True,
    jobs: int | str = 1,
) -> dict:
    """Train every selected arm and seed not yet finished (unless `train` is False: report on what is
    finished, or re-read the summary.json of a folder that holds no runs), then write the summary,
    report and plots. With `jobs` > 1 the arms and seeds train
    in that many worker processes at once (`train_plan_parallel`); `auto` chooses that number from
    the free memory and the arms' planned peaks (`heft.reproduce.jobs`).

    Returns the content of `summary.json`.
    """
    plan = load_plan(config_path, overrides, output_dir)
    failed: list[str] = []
    # Training locks the folder: a second `heft reproduce` into it gets RunFolderBusy. A report alone
    # only reads finished runs and replaces the summary, report and plots whole, so it may run
    # beside training into the same folder (a progress report on long runs).
    with run_folder_lock(plan.output_dir) if train else contextlib.nullcontext():
        if train and jobs == "auto":
            jobs = auto_jobs(plan)
        if train and jobs > 1:
            failed = train_plan_parallel(plan, jobs)
        elif train:
            train_plan(plan, show_progress)
        invocation = {"config": str(config_path), "overrides": list(overrides), "command": shlex.join(sys.argv)}
        if not train and _only_a_summary(plan):
            log.info("%s holds no run folders: re-reading the per-run records of its summary.json", plan.output_dir)
            summary = reread(json.loads((plan.output_dir / "summary.json").read_text()), plan)
            summary["reread"] = {**invocation, "output_dir": str(plan.output_dir), "versions": versions()}
        else:
            summary = summarize(plan)
            summary.update(invocation)
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(plan.output_dir / "summary.json", summary)
        atomic_write_text(plan.output_dir / "report.md", render_report(summary))
        plot(summary, plan.output_dir)
    log.info("wrote %s/summary.json, report.md and plots", plan.output_dir)
    if failed:
        raise ReproduceJobsFailed(f"{len(failed)} job(s) failed: " + "; ".join(failed))
    return summary
