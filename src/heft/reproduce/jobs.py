"""`heft reproduce --jobs auto`: how many arms train side by side, from the memory free now and the
training peak `heft plan` traces for each pending arm.

A small model leaves a GPU mostly idle in one process (its steps are bound by kernel launches), so
several processes share it well, up to the memory they need together. Each worker's peak is
planned, not guessed: `memory_plan.plan_run` traces one training step of every stage. What the plan
does not count is each process's fixed cost (`PROCESS_OVERHEAD`: a CUDA context, or on the CPU the
imported libraries), added per worker, and allocator slack, left to `HEADROOM`. Each worker also needs
a host core to dispatch its ops, so cores cap N on either device.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict

from heft.memory_plan import GIB, HEADROOM, Device, default_target_tokens, meminfo_bytes, plan_run
from heft.reproduce.plan import Plan
from heft.reproduce.run import plan_jobs
from heft.tasks import task_for

log = logging.getLogger("heft")

PROCESS_OVERHEAD = {"cuda": 768 * 2**20, "cpu": 768 * 2**20}
"""Bytes a worker holds beside its planned peak: a CUDA context (about 0.5 GiB on an H100/H200, with
cuBLAS workspaces), or on the CPU the resident set of torch, transformers and peft once imported."""


def free_memory(kind: str) -> int:
    """Bytes free now: the current GPU's (`torch.cuda.mem_get_info`) or the RAM that can be had
    without swapping (MemAvailable)."""
    if kind == "cuda":  # asked in a child process: a context opened here would hold memory all run long
        probe = "import torch; print(torch.cuda.mem_get_info()[0])"
        return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
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
    arm's peak plus a process's overhead as fit in HEADROOM of the free memory, at most one per core
    and one per pending job, at least one."""
    pending = pending_jobs(plan)
    if not pending:
        return 1, "no job pending"
    peaks = arm_peaks(plan, sorted({arm for _, arms in pending for arm in arms}), kind)
    largest = max(peaks, key=peaks.get)
    free = free_memory(kind)
    per_worker = peaks[largest] + PROCESS_OVERHEAD[kind]
    fit = int(free * HEADROOM // per_worker)
    why = (
        f"{kind}: {free / GIB:.1f} GiB free × {HEADROOM:.0%} / {per_worker / GIB:.2f} GiB per arm "
        f"(the planned peak of {largest} + {PROCESS_OVERHEAD[kind] / GIB:.2f} per process) = {fit}"
    )
    caps = [(len(pending), "pending jobs"), (os.cpu_count() or 1, "cores")]
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
