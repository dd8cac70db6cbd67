"""Training the plan: every arm and seed, shared prefixes once, resumable at every epoch."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from heft.config import ConfigError, RunConfig, config_to_dict, load_config
from heft.files import write_json
from heft.models import hide_library_progress_bars
from heft.provenance import BRANCH_RECORD, branch_record
from heft.reproduce.plan import Plan
from heft.tasks import task_for
from heft.train import run_training

log = logging.getLogger("heft")


def _settings(cfg: RunConfig) -> dict:
    """A config as `_check_same_config` compares it: without the evaluation schedule and trackers, and with the
    evaluation split the task resolves (folders saved before `data.eval_split: null` meant "the task's
    default" hold that default by name)."""
    ignore = ("eval_zero_shot", "output_dir", "eval_every", "report_to", "log_every")
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    settings["data"]["eval_split"] = task_for(cfg).eval_split(cfg.data)
    return settings


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume or reuse a folder trained with other settings (e.g. another subsample).
    When to evaluate is not one of them: evaluations leave training untouched (each epoch seeds its
    own batches and dropout), so a long run may go on evaluating less often; nor are the trackers."""
    if not (run_dir / "config.yaml").is_file():
        return
    saved, wanted = _settings(load_config(run_dir / "config.yaml")), _settings(cfg)
    if saved != wanted:
        differ = ", ".join(k for k in wanted if saved.get(k) != wanted[k])
        raise ConfigError(
            f"{run_dir} holds a run with different settings ({differ}); choose another output_dir or delete that folder"
        )


def branch(prefix_dir: Path, run_dir: Path, record: dict | None = None) -> None:
    """Start `run_dir` as a copy of a finished prefix run: its weights, trainer state (at the stage
    boundary) and metrics, and `record` (what it branched from) as BRANCH_RECORD, in one rename.
    The arm's own config and results are written by its training."""
    tmp = run_dir.with_name(run_dir.name + ".branching")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        prefix_dir,
        tmp,
        ignore=shutil.ignore_patterns("results.json", "config.yaml", BRANCH_RECORD, ".tmp-*", ".heft.lock*"),
    )
    if record is not None:
        write_json(tmp / BRANCH_RECORD, record)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():  # an earlier attempt stopped before its first checkpoint: nothing in it to resume
        shutil.rmtree(run_dir)
    tmp.rename(run_dir)


def train_plan(plan: Plan, show_progress: bool = True) -> None:
    """Train every selected arm and seed not finished yet; shared prefixes first, once per seed."""
    for seed in plan.seeds:  # seed-major: a partial multi-seed run already holds a full comparison
        for arm in plan.selected:
            run_dir, cfg = plan.run_dir(arm, seed), plan.configs[arm][seed]
            _check_same_config(run_dir, cfg)
            if (run_dir / "results.json").is_file():
                log.info("%s seed %d: finished earlier, read back from %s", arm, seed, run_dir)
                continue
            prefix = plan.prefixes.get(arm)
            if prefix is not None and not (run_dir / "manifest.json").is_file():
                prefix_dir = prefix.run_dir(seed)
                _check_same_config(prefix_dir, prefix.configs[seed])
                if not (prefix_dir / "results.json").is_file():
                    log.info("shared prefix %s seed %d: training into %s", prefix.name, seed, prefix_dir)
                    run_training(prefix.configs[seed], prefix_dir, show_progress)
                branch(prefix_dir, run_dir, branch_record(prefix_dir, prefix.name, prefix.stages))
                log.info("%s seed %d: branched from %s after %d stage(s)", arm, seed, prefix_dir, prefix.stages)
            log.info("%s seed %d: training into %s", arm, seed, run_dir)
            run_training(cfg, run_dir, show_progress)


def plan_jobs(plan: Plan) -> list[tuple[int, list[str]]]:
    """The plan cut into independent jobs: per seed, the arms that share one prefix go together (the
    prefix is trained once, by that job), every other arm alone. Longest first (epochs × stages as
    planned), so that a pool of workers ends as early as it can."""
    jobs = []
    for seed in plan.seeds:
        groups: dict[str, list[str]] = {}
        for arm in plan.selected:
            key = plan.prefixes[arm].name if arm in plan.prefixes else f"arm:{arm}"
            groups.setdefault(key, []).append(arm)
        jobs += [(seed, arms) for arms in groups.values()]

    def cost(job: tuple[int, list[str]]) -> float:
        seed, arms = job
        shared = plan.prefixes[arms[0]].stages if len(arms) > 1 else 0
        stages = [plan.configs[arm][seed].stages for arm in arms]
        return sum(s.epochs for s in stages[0][:shared]) + sum(s.epochs for st in stages for s in st[shared:])

    return sorted(jobs, key=cost, reverse=True)


def _train_job(plan: Plan, seed: int, arms: list[str], threads: int | None) -> float:
    """One worker's job: the full plan (so prefixes and zero-shot duties are those of a sequential
    run), restricted to one seed and a group of arms. Returns its wall time in seconds."""
    # force: a worker runs several jobs in turn, and each names its own in the log lines
    logging.basicConfig(
        level=logging.INFO, format=f"%(levelname)s [seed {seed} {'+'.join(arms)}] %(message)s", force=True
    )
    hide_library_progress_bars()  # workers train without bars (show_progress=False below)
    if threads:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    train_plan(dataclasses.replace(plan, seeds=[seed], selected=list(arms)), show_progress=False)
    return time.perf_counter() - start


def train_plan_parallel(plan: Plan, jobs: int) -> list[str]:
    """Train the plan's jobs (`plan_jobs`) in `jobs` worker processes side by side on this machine's
    device: a small model leaves a GPU mostly idle in one process (its steps are bound by kernel
    launches), so several processes share it well. Each run folder is still written by one process.

    Returns one line per failed job; the others run to the end regardless.
    """
    import torch

    todo = plan_jobs(plan)
    threads = None if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // jobs)
    failed: list[str] = []
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)) or 1, mp_context=context) as pool:
        running: dict[Future, tuple[int, list[str]]] = {
            pool.submit(_train_job, plan, seed, arms, threads): (seed, arms) for seed, arms in todo
        }
        for done_count in range(1, len(todo) + 1):
            future = next(iter(wait(running, return_when=FIRST_COMPLETED).done))
            seed, arms = running.pop(future)
            try:
                log.info(
                    "job %d/%d done: seed %d, %s (%.0f s)",
                    done_count,
                    len(todo),
                    seed,
                    ", ".join(arms),
                    future.result(),
                )
            except Exception as err:  # noqa: BLE001 - reported with the job, the others go on
                failed.append(f"seed {seed}, {', '.join(arms)}: {type(err).__name__}: {err}")
                log.error("job %d/%d failed: %s", done_count, len(todo), failed[-1])
    return failed
