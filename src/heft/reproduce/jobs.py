"""`heft reproduce --jobs auto`: how many arms train side by side, from the memory free now and the
training peak `heft plan` traces for each pending arm.

A small model leaves a GPU mostly idle in one process (its steps are bound by kernel launches), so
several processes share it well, up to the memory they need together. Each worker's peak is
planned, not guessed: `memory_plan.plan_run` traces one training step of every stage. What the plan
does not count (each process's CUDA context, allocator slack, libraries) is left to `HEADROOM`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

from heft.memory_plan import GIB, HEADROOM, Device, default_target_tokens, meminfo_bytes, plan_run
from heft.reproduce.plan import Plan
from heft.reproduce.run import plan_jobs
from heft.tasks import task_for

log = logging.getLogger("heft")


def free_memory(kind: str) -> int:
    """Bytes free now: the current GPU's (`torch.cuda.mem_get_info`) or the RAM that can be had
    without swapping (MemAvailable)."""
    if kind == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    return meminfo_bytes("MemAvailable") or 0


def pending_jobs(plan: Plan) -> list[tuple[int, list[str]]]:
    """The plan's jobs (`plan_jobs`) with at least one arm not finished."""
    return [
        (seed, arms)
        for seed, arms in plan_jobs(plan)
        if any(not (plan.run_dir(arm, seed) / "results.json").is_file() for arm in arms)
    ]


def _memory_key(plan: Plan, arm: str) -> str:
    """What an arm's peak depends on: model, shapes, precision and the stages' methods and adapters;
    not epochs, learning rates or seeds (arms alike in these are traced once)."""
    cfg = plan.configs[arm][plan.seeds[0]]
    stages = [{k: v for k, v in asdict(s).items() if k in ("method", "lora", "reft")} for s in cfg.stages]
    shapes = (cfg.model, cfg.dtype, cfg.batch_size, cfg.max_length, cfg.bf16, cfg.activation_checkpointing)
    return json.dumps([shapes, cfg.quantize and asdict(cfg.quantize), stages], sort_keys=True, default=str)


def arm_peaks(plan: Plan, arms: list[str], kind: str) -> dict[str, int]:
    """Each arm's planned training peak in bytes on a `kind` device (with activation checkpointing when
    the arm uses it), the largest over its stages."""
    traced: dict[str, int] = {}
    peaks = {}
    for arm in arms:
        key = _memory_key(plan, arm)
        if key not in traced:
            cfg = plan.configs[arm][plan.seeds[0]]
            bits = dict(weight_bits=cfg.quantize.bits, compute_dtype=cfg.quantize.compute_dtype) if cfg.quantize else {}
            planned = plan_run(
                cfg, Device(kind, None, kind), default_target_tokens(task_for(cfg)), alternatives=False, **bits
            )
            traced[key] = planned.peak_checkpointed if cfg.activation_checkpointing else planned.peak
        peaks[arm] = traced[key]
    return peaks


def choose_jobs(plan: Plan, kind: str) -> tuple[int, str]:
    """(N, why): the workers `--jobs auto` starts on a `kind` device: as many of the largest pending
    arm's peak as fit in HEADROOM of the free memory, on the CPU at most one per core, at most one per
    pending job, at least one."""
    pending = pending_jobs(plan)
    if not pending:
        return 1, "no job pending"
    peaks = arm_peaks(plan, sorted({arm for _, arms in pending for arm in arms}), kind)
    largest = max(peaks, key=peaks.get)
    free = free_memory(kind)
    fit = int(free * HEADROOM // peaks[largest])
    why = (
        f"{kind}: {free / GIB:.1f} GiB free × {HEADROOM:.0%} / {peaks[largest] / GIB:.2f} GiB per arm "
        f"(the planned peak of {largest}) = {fit}"
    )
    caps = [(len(pending), "pending jobs")]
    if kind == "cpu":
        caps.append((os.cpu_count() or 1, "cores"))
    n = fit
    for cap, what in caps:
        if cap < n:
            n, why = cap, f"{why}, capped by {cap} {what}"
    return max(1, n), why


def auto_jobs(plan: Plan) -> int:
    """`choose_jobs` on this machine's training device, its choice and reason logged in one line."""
    import torch

    n, why = choose_jobs(plan, "cuda" if torch.cuda.is_available() else "cpu")
    log.info("--jobs auto: %d (%s)", n, why)
    return n
