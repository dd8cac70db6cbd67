"""`heft plan`: a run's memory from the model's config alone, checked against measured peaks."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig

import heft
import heft.cli
from heft import memory_plan
from heft.cli import main
from heft.config import RunConfig, StageConfig
from heft.memory_plan import (
    GIB,
    Device,
    LiveBytes,
    advice,
    meta_model,
    parse_memory,
    plan_run,
    trace_step,
    traced_depth,
)
from heft.methods.lora import LoraConfig
from heft.methods.reft import ReftConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOLERANCE = 0.25
"""The issue's bound on a plan's error against a measured peak."""


def test_parse_memory_reads_sizes_and_refuses_the_rest() -> None:
    assert parse_memory("24GB") == parse_memory("24 GiB") == parse_memory("24") == parse_memory("24g") == 24 * GIB
    assert parse_memory("40000MB") == 40000 * 2**20
    assert parse_memory("1.5TB") == int(1.5 * 2**40)
    for bad in ("lots", "24 GBs", "-1GB", "0", "", "24 XB", "GB"):
        with pytest.raises(ValueError, match="not an amount of memory"):
            parse_memory(bad)


def test_a_gpu_memory_that_does_not_parse_fails_in_one_line_naming_the_flag(capsys) -> None:
    assert main(["plan", str(REPO / "configs" / "boolq_heft.yaml"), "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpu-memory:") and "'lots'" in err[0]


def test_live_bytes_counts_each_storage_from_creation_until_freed() -> None:
    with FakeTensorMode():
        live = LiveBytes()
        with live:
            a = torch.empty(1024)  # 4 KiB
            b = a * 2  # 4 KiB
            view = b[:10]  # b's storage, not counted again
            del b
            c = torch.empty(256, dtype=torch.bfloat16)  # 512 B, with a, b's storage (through view): the peak
            del a
        assert (live.peak, live.now) == (2 * 4096 + 512, 4096 + 512)
        del view, c
        assert live.now == 0


def tiny_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


HEFT_STAGES = [
    StageConfig(method="lora", lora=LoraConfig(r=4, dropout=0.1)),
    StageConfig(method="loreft", reft=ReftConfig(rank=2, positions="f2+l2", dropout=0.1)),
]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("device_kind", ["cpu", "cuda"])
def test_the_line_through_two_and_three_layers_gives_the_full_traces_bytes(checkpointing, device_kind) -> None:
    """`traced_depth` extends a line through 2- and 3-layer traces to the model's depth; for a 6-layer
    model it must equal the 6-layer trace, field by field (LoRA, then LoReFT after the merge). Were a
    layer's bytes not the same at every depth, or the first layer not excluded, they would differ."""
    config = tiny_config(6)
    cfg = RunConfig(batch_size=4, max_length=40, bf16=True, stages=HEFT_STAGES)
    for index, stage in enumerate(cfg.stages):
        before = cfg.stages[:index]
        full = trace_step(meta_model(config, "float32", before, stage), 4, 40, 1, True, checkpointing, device_kind)
        line = traced_depth(config, "float32", before, stage, cfg, 1, checkpointing, device_kind)
        assert line == full
        assert full.activations > 0 and full.peak > full.static


def test_advice_says_what_fits_and_what_would(tiny_model_dir) -> None:
    cfg = RunConfig(model=str(tiny_model_dir), batch_size=8, max_length=64, bf16=True, stages=HEFT_STAGES)
    plan = plan_run(cfg, Device("cuda", None, "unknown"), alternatives=True)
    assert plan.peak_checkpointed < plan.peak
    assert {w.label for w in plan.alternatives} == {
        "bfloat16 weights",
        "8-bit base (bfloat16 compute)",
        "4-bit base (bfloat16 compute)",
    }
    quantized = next(stages for w, stages in plan.alternatives.items() if w.bits == 4)
    assert sum(quantized[0].weights.values()) < sum(plan.stages[0].weights.values())

    def on(budget: int) -> list[str]:
        return advice(
            dataclasses.replace(plan, device=Device("cuda", math.ceil(budget / memory_plan.HEADROOM) + 1, "x"))
        )

    assert on(plan.peak)[0].startswith("fits: peak")
    between = on((plan.peak + plan.peak_checkpointed) // 2)
    assert between[0].startswith("does not fit") and any("activation_checkpointing: true fits" in s for s in between)
    fixed = max(s.fixed for s in plan.stages)
    assert any("nothing planned here fits" in s or "4-bit" in s for s in on(fixed // 2))


def plan_accuracy():
    """tools/plan_accuracy.py, which prints these comparisons as docs/results/plan's tables."""
    spec = importlib.util.spec_from_file_location("plan_accuracy", REPO / "tools" / "plan_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_plans_are_within_25_percent_of_the_gpu_bench_records() -> None:
    """Each committed warm H200 record against the plan of its path at its batch size × max_length.
    The records' widest batch can be narrower than max_length (491 of 512 at 64 × 512): a plan is for
    the widest batch the run allows."""
    comparisons = plan_accuracy().gpu_comparisons()
    assert {(c["batch"], c["length"], c["checkpointing"]) for c in comparisons} >= {
        (64, 512, False),
        (64, 512, True),
        (16, 64, False),
    }
    for c in comparisons:
        assert abs(c["planned_mb"] / c["measured_mb"] - 1) <= TOLERANCE, c


@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "max_length"), [(4, 128), (8, 256)])
def test_cpu_plans_are_within_25_percent_of_heft_trains_measured_peak(tmp_path, batch_size, max_length) -> None:
    """`heft train`'s recipe on smollm2 in a fresh process against the plan's peak over both stages.
    At 128 tokens the CPU trains with SDPA's math kernel, at 256 with flash."""
    planned, measured = plan_accuracy().cpu_comparison(batch_size, max_length, tmp_path)
    assert abs(planned / measured - 1) <= TOLERANCE, (planned, measured)


VERDICT = re.compile(r"fits, batch ≤ \d+|checkpointing, batch ≤ \d+|batch ≤ \d+ \+ checkpointing|does not fit")


def test_llama_2_7b_plan_states_what_fits_in_24_40_and_80_gb(monkeypatch, capsys) -> None:
    """The shipped Llama-2-7B config.json (no weights) under the default HEFT config: a per-stage table,
    and a verdict for bf16 weights and a 4-bit base in 24, 40 and 80 GB."""
    plans = []
    real = memory_plan.plan_run
    monkeypatch.setattr(memory_plan, "plan_run", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    monkeypatch.setattr(heft.cli, "console", Console(width=240, force_terminal=False))
    config = str(REPO / "configs" / "boolq_heft.yaml")
    assert main(["plan", config, f"model={REPO / 'configs' / 'models' / 'llama-2-7b'}", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    (plan,) = plans
    assert plan.architecture == "LlamaForCausalLM" and 6.6e9 < plan.parameters < 6.8e9
    assert [s.name for s in plan.stages] == ["0-lora", "1-loreft"] and all(s.name in out for s in plan.stages)
    header = next(line for line in out.splitlines() if "24 GB" in line)
    assert "40 GB" in header and "80 GB" in header
    rows = {
        label: next(line for line in out.splitlines() if line.strip("│ ").startswith(label))
        for label in (
            "bfloat16 weights",
            "4-bit base",
        )
    }
    for line in rows.values():
        assert len(VERDICT.findall(line)) == 3, line
    bf16 = next(s for w, s in plan.alternatives.items() if w.dtype == "bfloat16" and not w.bits)
    nf4 = next(s for w, s in plan.alternatives.items() if w.bits == 4)
    assert sum(nf4[0].weights.values()) < 0.35 * sum(bf16[0].weights.values())
    batches = [plan.largest_batch(nf4, int(gb * GIB * 0.9), checkpointing=False) for gb in (24, 40, 80)]
    assert batches == sorted(batches) and batches[-1] > batches[0]
    assert ("fits: peak" in out) == (plan.peak <= plan.device.usable) and plan.device.usable == int(80 * GIB * 0.9)
