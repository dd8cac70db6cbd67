"""`heft bench --check BASELINE.json`: rerun a committed benchmark and flag the paths that slowed.

Absolute tokens/s differ between machines and between busy and idle hours, so the comparison is on
ratios measured within one run: each path's MFU (model FLOPs ÷ the GEMM peak measured in the same
run) and heft's LoRA step against transformers + peft on the same batches. Even ratios move with the
CPU model, its features and the thread count, so a baseline recorded on another machine is reported
as not comparable instead of being compared. Not a test: CI machines are too noisy for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table

MACHINE_KEYS = ("cpu", "cpu_flags", "torch_threads", "gpu")
"""What must match for ratios to be comparable: the CPU model and its GEMM features, the threads
torch uses, and the GPU."""

NOT_COMPARABLE = 3
"""Exit status of a check whose baseline was recorded on another machine or other batches (1: a path slowed)."""

RATIO = "heft_lora_vs_peft_lora"


def baseline_settings(record: dict, name: str = "the baseline") -> dict:
    """The `run_bench` arguments that repeat the baseline's measurement."""
    try:
        data, settings = record["data"], record["settings"]
        return {
            "model": record["model"]["id"],
            "batches": data["batches"],
            "batch_size": data["batch_size"],
            "max_length": data["max_length"],
            "device": record["machine"]["device"],
            "paths": list(record["paths"]),
            "repeats": settings["gemm_repeats"],
            "warmup": settings["warmup_steps"],
            "activation_checkpointing": settings.get("activation_checkpointing", False),
            "compile_mode": settings.get("compile"),
            "pad_to_multiple_of": settings.get("pad_to_multiple_of", 1),  # records before buckets: none
            "clock": settings.get("clock", "wall"),
            "threads": record["machine"].get("torch_threads"),
            "dtype": settings.get("weights_dtype", "float32"),
            "quantize": (settings.get("quantize") or {}).get("bits"),
            "synthetic": settings.get("synthetic", str(data.get("source", "")).startswith("synthetic")),
            "fast_dropout": settings.get("lora_fast_dropout", False),
        }
    except (KeyError, TypeError) as err:
        raise ValueError(f"{name} is not a JSON record written by `heft bench` (no {err})") from None


def machine_differences(baseline: dict, current: dict) -> list[str]:
    """Why a baseline's machine is not this one (empty when it is), from the recorded machine info."""
    old, new = baseline.get("machine", {}), current.get("machine", {})
    out = [
        f"{key}: {old.get(key)!r} in the baseline, {new.get(key)!r} here"
        for key in MACHINE_KEYS
        if old.get(key) != new.get(key)
    ]
    if torch.device(old.get("device", "cpu")).type != torch.device(new.get("device", "cpu")).type:
        out.append(f"device: {old.get('device')!r} in the baseline, {new.get('device')!r} here")
    return out


def data_differences(baseline: dict, now: dict) -> list[str]:
    """Different batches or model shapes make ratios incomparable even on the same machine."""
    out = []
    for section, key in (("data", "tokens"), ("data", "padded_tokens"), ("model", "linear_params")):
        old, new = baseline.get(section, {}).get(key), now.get(section, {}).get(key)
        if old != new:
            out.append(f"{section} {key}: {old} in the baseline, {new} now")
    return out


@dataclass
class Change:
    """One compared ratio: `change` is now ÷ baseline − 1; `slower` when it fell past the tolerance."""

    name: str
    metric: str
    baseline: float | None
    now: float | None
    change: float | None
    slower: bool


def compare(baseline: dict, now: dict, tolerance: float = 0.10) -> list[Change]:
    """Each path's MFU, and heft LoRA ÷ peft LoRA, baseline against now (higher is better for both).

    A path missing from either record, or without a value, is listed with no change and never fails.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance {tolerance} must be a fraction in [0, 1)")
    pairs = [
        (path, "MFU", baseline["paths"].get(path, {}).get("mfu"), now["paths"].get(path, {}).get("mfu"))
        for path in dict.fromkeys([*baseline["paths"], *now["paths"]])
    ]
    if baseline.get(RATIO) is not None or now.get(RATIO) is not None:
        pairs.append(("lora", "× peft-lora", baseline.get(RATIO), now.get(RATIO)))
    changes = []
    for name, metric, old, new in pairs:
        change = new / old - 1 if old and new is not None else None
        changes.append(Change(name, metric, old, new, change, change is not None and change < -tolerance))
    return changes


def check_table(changes: list[Change], tolerance: float, reasons: list[str], baseline_name: str) -> Table:
    title = f"heft bench --check {baseline_name}: ratios measured in each run (tolerance −{100 * tolerance:g} %)"
    table = Table(title=title, caption="NOT COMPARABLE: " + "; ".join(reasons) if reasons else None)
    for column in ("path", "ratio", "baseline", "now", "change", ""):
        table.add_column(column, justify="left" if column in ("path", "ratio", "") else "right")
    for c in changes:
        fmt = (
            (lambda x: "—" if x is None else f"{100 * x:.1f} %")
            if c.metric == "MFU"
            else (lambda x: "—" if x is None else f"{x:.2f}×")
        )
        verdict = "[red]slower[/]" if c.slower else "" if c.change is None else "ok"
        table.add_row(
            c.name,
            c.metric,
            fmt(c.baseline),
            fmt(c.now),
            "—" if c.change is None else f"{100 * c.change:+.1f} %",
            verdict,
        )
    return table


def exit_status(changes: list[Change], reasons: list[str]) -> int:
    """3 when the baseline is not comparable (its verdicts are shown, not judged); else 1 when a
    path slowed past the tolerance; else 0."""
    if reasons:
        return NOT_COMPARABLE
    return 1 if any(c.slower for c in changes) else 0
