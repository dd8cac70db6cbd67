"""`heft reproduce --jobs auto`: N from the free memory (stubbed here) over the largest pending arm's planned
peak plus a process's overhead, capped by the pending jobs and the cores; arms alike in memory are planned once."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

import heft.reproduce.jobs as jobs
from heft.cli import build_parser
from heft.memory_plan import GIB
from heft.reproduce import load_plan
from heft.reproduce.run import plan_jobs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reproduce_boolq.yaml"


@pytest.fixture
def planned(monkeypatch) -> list[tuple[str, ...]]:
    """plan_run stubbed: a joint stage peaks at 6 GiB, any other at 3 GiB; returns the stage methods planned."""
    calls: list[tuple[str, ...]] = []

    def fake_plan_run(cfg, device, target_tokens, alternatives):
        methods = tuple(s.method for s in cfg.stages)
        calls.append(methods)
        peak = (6 if "joint" in methods else 3) * GIB
        return SimpleNamespace(peak=peak, peak_checkpointed=peak // 3)

    monkeypatch.setattr(jobs, "plan_run", fake_plan_run)
    monkeypatch.setattr(jobs, "PROCESS_OVERHEAD", {"cuda": 0, "cpu": 0})
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 64)
    return calls


def free(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(jobs, "free_memory", lambda kind: int(gib * GIB))


def test_memory_sets_n_at_the_largest_arms_peak(tmp_path, monkeypatch, planned):
    plan = load_plan(CONFIG, ["preset=full"], tmp_path)
    free(monkeypatch, 40)
    n, why = jobs.choose_jobs(plan, "cuda")
    assert len(plan_jobs(plan)) > 6
    assert n == 6, why  # 40 GiB × 90 % / 6 GiB (joint-3)
    assert why == "cuda: 40.0 GiB free × 90% / 6.00 GiB per arm (the planned peak of joint-3 + 0.00 per process) = 6"
    # lora-20 and lora-3 alike, loreft-20 and loreft-3, heft-2+1 and heft-1+2: 5 traces for 8 arms
    assert len(planned) == 5 and len(set(planned)) == 4  # heft-2+1-identity: same methods, another init
    monkeypatch.setattr(jobs, "PROCESS_OVERHEAD", {"cuda": 3 * GIB, "cpu": 0})
    assert jobs.choose_jobs(plan, "cuda")[0] == 4  # each worker's CUDA context counts: 36 GiB / 9 GiB
    monkeypatch.setattr(jobs, "PROCESS_OVERHEAD", {"cuda": 0, "cpu": 0})

    plan = load_plan(CONFIG, ["preset=full", "arms_only=[lora-3,loreft-3]"], tmp_path)
    assert jobs.choose_jobs(plan, "cuda")[0] == 6  # 12 fit at 3 GiB, 3 seeds × 2 arms pending
    free(monkeypatch, 1)
    assert jobs.choose_jobs(plan, "cuda")[0] == 1  # not even one fits: one job at a time, as before


def test_finished_jobs_and_cores_cap_n(tmp_path, monkeypatch, planned):
    plan = load_plan(CONFIG, ["preset=full", "arms_only=[lora-3,loreft-3]"], tmp_path)
    for seed, arms in plan_jobs(plan)[2:]:  # all but two jobs finished earlier
        for arm in arms:
            plan.run_dir(arm, seed).mkdir(parents=True)
            (plan.run_dir(arm, seed) / "results.json").write_text("{}")
    free(monkeypatch, 100)
    n, why = jobs.choose_jobs(plan, "cuda")
    assert n == 2 and why.endswith("= 30, capped by 2 pending jobs")

    plan = load_plan(CONFIG, ["preset=full", "arms_only=[lora-3,loreft-3]"], tmp_path / "fresh")
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 4)
    n, why = jobs.choose_jobs(plan, "cpu")
    assert n == 4 and why.endswith("capped by 6 pending jobs, capped by 4 cores")
    assert jobs.choose_jobs(plan, "cuda")[0] == 4  # a GPU's workers need a host core each too


def test_checkpointed_arms_are_planned_with_checkpointing(tmp_path, monkeypatch, planned):
    plan = load_plan(CONFIG, ["preset=full", "arms_only=[lora-3]", "base.activation_checkpointing=true"], tmp_path)
    free(monkeypatch, 10)
    assert jobs.choose_jobs(plan, "cuda")[0] == 3  # 10 GiB × 90 % / 1 GiB, capped by 3 seeds


def test_auto_logs_its_choice_in_one_line(tmp_path, monkeypatch, planned, caplog):
    plan = load_plan(CONFIG, ["preset=full", "arms_only=[lora-3]"], tmp_path)
    free(monkeypatch, 40)
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the CPU, on any machine
    with caplog.at_level(logging.INFO, logger="heft"):
        assert jobs.auto_jobs(plan) == 3
    (line,) = [r.getMessage() for r in caplog.records if "--jobs auto" in r.getMessage()]
    assert line.startswith("--jobs auto: 3 (") and "\n" not in line


def test_cli_takes_auto_or_a_number():
    parse = build_parser().parse_args
    assert parse(["reproduce", "x.yaml", "--jobs", "auto"]).jobs == "auto"
    assert parse(["reproduce", "x.yaml", "--jobs", "3"]).jobs == 3
    for bad in ("many", "0", "-2"):
        with pytest.raises(SystemExit):
            parse(["reproduce", "x.yaml", "--jobs", bad])
