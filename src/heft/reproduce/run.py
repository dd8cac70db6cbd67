"""Training the plan: every arm and seed, shared prefixes once, resumable at every epoch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from heft.config import ConfigError, RunConfig, config_to_dict, load_config
from heft.reproduce.plan import Plan
from heft.train import run_training

log = logging.getLogger("heft")


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume or reuse a folder trained with other settings (e.g. another subsample)."""
    if not (run_dir / "config.yaml").is_file():
        return
    ignore = ("eval_zero_shot", "output_dir")
    saved = {k: v for k, v in config_to_dict(load_config(run_dir / "config.yaml")).items() if k not in ignore}
    wanted = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    if saved != wanted:
        differ = ", ".join(k for k in wanted if saved.get(k) != wanted[k])
        raise ConfigError(f"{run_dir} holds a run with different settings ({differ}); "
                          "choose another output_dir or delete that folder")




def branch(prefix_dir: Path, run_dir: Path) -> None:
    """Start `run_dir` as a copy of a finished prefix run: its weights, trainer state (at the stage
    boundary) and metrics. The arm's own config and results are written by its training."""
    tmp = run_dir.with_name(run_dir.name + ".branching")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(prefix_dir, tmp, ignore=shutil.ignore_patterns("results.json", "config.yaml", ".tmp-*", ".heft.lock*"))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
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
                branch(prefix_dir, run_dir)
                log.info("%s seed %d: branched from %s after %d stage(s)", arm, seed, prefix_dir, prefix.stages)
            log.info("%s seed %d: training into %s", arm, seed, run_dir)
            run_training(cfg, run_dir, show_progress)
