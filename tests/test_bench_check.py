"""`heft bench --check`: the comparison of ratios, on synthetic records (nothing is timed)."""

from __future__ import annotations

import copy
import json

import pytest

import heft.bench as bench
from heft.bench_check import (
    NOT_COMPARABLE,
    baseline_settings,
    compare,
    data_differences,
    exit_status,
    machine_differences,
)
from heft.cli import main

MACHINE = {
    "cpu": "AMD EPYC",
    "cpu_flags": ["avx2", "avx512f", "avx512_bf16"],
    "cores": 2,
    "cores_available": 2,
    "torch_threads": 2,
    "device": "cpu",
    "gpu": None,
    "platform": "Linux",
}


def record(mfu: dict[str, float], ratio: float | None = 1.28, **machine) -> dict:
    """The parts of a `heft bench` JSON that the check reads."""
    return {
        "machine": {**MACHINE, **machine},
        "model": {"id": "smollm2-135m", "linear_params": 106168320},
        "data": {"batches": 12, "batch_size": 8, "max_length": 256, "tokens": 13646, "padded_tokens": 14336},
        "settings": {"gemm_repeats": 10, "warmup_steps": 1},
        "paths": {p: {"mfu": m, "tok_s": 1e6} for p, m in mfu.items()},
        "heft_lora_vs_peft_lora": ratio,
    }


BASE = record({"scoring": 0.52, "lora": 0.27, "peft-lora": 0.21, "loreft": 0.47})


def test_a_path_that_slowed_past_the_tolerance_fails():
    now = record({"scoring": 0.53, "lora": 0.24, "peft-lora": 0.21, "loreft": 0.44}, ratio=1.14)
    changes = {(c.name, c.metric): c for c in compare(BASE, now, tolerance=0.10)}
    assert changes["scoring", "MFU"].change == pytest.approx(0.53 / 0.52 - 1) and not changes["scoring", "MFU"].slower
    assert changes["lora", "MFU"].change == pytest.approx(-1 / 9) and changes["lora", "MFU"].slower
    assert not changes["loreft", "MFU"].slower, "−6.4 % is within 10 %"
    assert changes["lora", "× peft-lora"].slower and changes["lora", "× peft-lora"].baseline == 1.28
    assert exit_status(list(changes.values()), []) == 1
    assert not any(c.slower for c in compare(BASE, now, tolerance=0.12))
    assert exit_status(compare(BASE, now, tolerance=0.12), []) == 0


def test_faster_equal_and_missing_paths_pass():
    now = record({"scoring": 0.70, "lora": 0.27, "joint": 0.3}, ratio=None)
    changes = compare(BASE, now)
    assert [(c.name, c.metric) for c in changes] == [
        ("scoring", "MFU"),
        ("lora", "MFU"),
        ("peft-lora", "MFU"),
        ("loreft", "MFU"),
        ("joint", "MFU"),
        ("lora", "× peft-lora"),
    ]
    assert [c.change is None for c in changes] == [False, False, True, True, True, True]
    assert not any(c.slower for c in changes) and exit_status(changes, []) == 0
    with pytest.raises(ValueError, match="tolerance"):
        compare(BASE, now, tolerance=10)


def test_another_machine_or_other_batches_are_not_comparable():
    assert machine_differences(BASE, {"machine": dict(MACHINE)}) == []
    other = machine_differences(BASE, {"machine": {**MACHINE, "cpu": "Intel Xeon", "cpu_flags": ["avx2", "amx_bf16"]}})
    assert len(other) == 2 and "'Intel Xeon' here" in other[0]
    assert machine_differences(BASE, {"machine": {**MACHINE, "torch_threads": 1}}) != []
    assert machine_differences(BASE, {"machine": {**MACHINE, "device": "cuda:0", "gpu": "NVIDIA H100"}}) != []
    assert machine_differences(BASE, {"machine": {**MACHINE, "cores": 64, "platform": "other"}}) == [], (
        "informative only"
    )
    shorter = copy.deepcopy(BASE)
    shorter["data"]["tokens"] = 9000
    assert data_differences(BASE, shorter) == ["data tokens: 13646 in the baseline, 9000 now"]
    slowed = compare(BASE, record({"lora": 0.1}))
    assert exit_status(slowed, ["cpu differs"]) == NOT_COMPARABLE, "no verdict across machines"


def test_settings_come_from_the_baseline_and_the_committed_json_has_them():
    assert baseline_settings(BASE) == {
        "model": "smollm2-135m",
        "batches": 12,
        "batch_size": 8,
        "max_length": 256,
        "device": "cpu",
        "paths": ["scoring", "lora", "peft-lora", "loreft"],
        "repeats": 10,
        "warmup": 1,
        "activation_checkpointing": False,
        "compile_mode": None,
        "pad_to_multiple_of": 1,
        "clock": "wall",
        "threads": 2,
        "dtype": "float32",
        "quantize": None,
        "synthetic": False,
        "fast_dropout": False,
    }
    quantized = {**BASE, "settings": {**BASE["settings"], "weights_dtype": "bfloat16", "quantize": {"bits": 4}}}
    assert baseline_settings(quantized) == {**baseline_settings(BASE), "dtype": "bfloat16", "quantize": 4}, (
        "a baseline on a quantized bf16 base is rerun on one"
    )
    one_thread = {**BASE, "machine": {**MACHINE, "torch_threads": 1}, "settings": {**BASE["settings"], "clock": "cpu"}}
    assert baseline_settings(one_thread) == {**baseline_settings(BASE), "clock": "cpu", "threads": 1}, (
        "a baseline timed on one thread's CPU clock is rerun so"
    )
    from pathlib import Path

    for committed in (Path(__file__).resolve().parents[1] / "docs" / "results" / "bench").glob("*.json"):
        if committed.name == "op-counts.json":  # tools/count_ops.py's counts, not a `heft bench` record
            continue
        settings = baseline_settings(json.loads(committed.read_text()))
        assert settings["paths"] and set(settings["paths"]) <= set(bench.PATHS)
    with pytest.raises(ValueError, match="not a JSON record written by `heft bench`"):
        baseline_settings({"paths": {}})


def test_cli_exit_status_without_timing_anything(tmp_path, monkeypatch, capsys):
    """The command line: another machine stops before running; on this machine a slowed path exits 1."""
    here = {**MACHINE, "cpu": "This CPU"}
    monkeypatch.setattr(bench, "machine_info", lambda device: dict(here))
    runs = []

    def fake_run(**settings):
        runs.append(settings)
        return record({"scoring": 0.52, "lora": 0.20, "peft-lora": 0.21, "loreft": 0.47}, ratio=0.95)

    monkeypatch.setattr(bench, "run_bench", fake_run)
    monkeypatch.setattr(bench, "tables", lambda record: [])  # the record's tables are tested in test_bench.py
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(BASE))
    out = tmp_path / "now.json"
    assert main(["bench", "--check", str(baseline), "--json", str(out)]) == NOT_COMPARABLE
    assert not runs and "not comparable" in capsys.readouterr().err

    here["cpu"] = "AMD EPYC"
    assert main(["bench", "--check", str(baseline), "--json", str(out)]) == 1
    assert runs[-1] == baseline_settings(BASE)
    captured = capsys.readouterr()
    assert "-25.9 %" in captured.out and "slower" in captured.out and "lora MFU -25.9 %" in captured.err
    assert json.loads(out.read_text())["paths"]["lora"]["mfu"] == 0.20
    assert main(["bench", "--check", str(baseline), "--json", str(out), "--tolerance", "30"]) == 0
    assert main(["bench", "--check", str(tmp_path / "missing.json")]) == 2


def test_a_one_thread_baseline_is_rerun_on_one_thread(tmp_path, monkeypatch):
    """The baseline's torch thread count is set before the machines are compared, so a record
    taken with `--threads 1` is comparable on the machine that made it."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(bench, "machine_info", lambda device: {**MACHINE, "torch_threads": torch.get_num_threads()})
    monkeypatch.setattr(bench, "run_bench", lambda **settings: record({"lora": 0.27}))
    monkeypatch.setattr(bench, "tables", lambda record: [])
    baseline = tmp_path / "one-thread.json"
    baseline.write_text(json.dumps(record({"lora": 0.27}, torch_threads=1)))
    try:
        torch.set_num_threads(2)
        assert main(["bench", "--check", str(baseline), "--json", str(tmp_path / "now.json")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
