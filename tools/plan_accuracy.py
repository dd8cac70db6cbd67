"""`heft plan`'s peaks beside measured ones: the tables of docs/results/plan/README.md.

    python tools/plan_accuracy.py gpu        # the committed H200 bench records against their plans
    python tools/plan_accuracy.py cpu        # heft train's recipe on smollm2 at 4 × 128 and 8 × 256 (minutes)

tests/test_memory_plan.py asserts the same comparisons (through this module) within 25 %.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import heft
from heft.bench import stage_config
from heft.config import RunConfig, load_config
from heft.memory_plan import Device, plan_run

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "docs" / "results" / "bench"
CPU_SHAPES = ((4, 128), (8, 256))


def gpu_comparisons() -> list[dict]:
    """One per heft training path of each warm H200 record (the first lease's predate the bf16 weight
    copies), compile off: the record's CUDA max allocated (weights included, smollm2's shapes, float32
    weights under bf16 autocast) against the plan of its path at its batch size × max_length."""
    out = []
    plans = {}
    for path in sorted(BENCH.glob("gpu-h200-warm-*.json")):
        record = json.loads(path.read_text())
        if record["settings"].get("compile"):
            continue
        batch, length = record["data"]["batch_size"], record["data"]["max_length"]
        checkpointing = bool(record["settings"].get("activation_checkpointing"))
        for name in ("lora", "loreft", "joint"):
            if name not in record["paths"]:
                continue
            if (batch, length, name) not in plans:
                cfg = RunConfig(batch_size=batch, max_length=length, bf16=True, stages=[stage_config(name)])
                plans[batch, length, name] = plan_run(cfg, Device("cuda", None, "H200"), alternatives=False).stages[0]
            stage = plans[batch, length, name]
            out.append(
                {
                    "record": path.name,
                    "path": name,
                    "batch": batch,
                    "length": length,
                    "checkpointing": checkpointing,
                    "planned_mb": (stage.peak_checkpointed if checkpointing else stage.peak) / 2**20,
                    "measured_mb": record["paths"][name]["peak_memory_mb"],
                }
            )
    return out


def cpu_comparison(batch: int, length: int, out: Path) -> tuple[float, float]:
    """heft train's recipe (configs/boolq_heft.yaml, LoRA then LoReFT) on smollm2 in a fresh process:
    the plan's peak over both stages and the measured peak RSS above the RSS before the model loads, MiB."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(heft.__file__).parents[1]), str(REPO / "tests")]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    script = [sys.executable, str(REPO / "tests" / "plan_measure_script.py"), str(out), str(batch), str(length)]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"plan_measure_script.py failed:\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])["above_mb"]
    cfg = load_config(REPO / "configs" / "boolq_heft.yaml", [f"batch_size={batch}", f"max_length={length}"])
    planned = plan_run(cfg, Device("cpu", None, "cpu"), alternatives=False).peak / 2**20
    return planned, measured


def gpu_rows() -> list[str]:
    rows = ["| record | path | batch | ckpt | plan MiB | measured MiB |", "|---|---|---|---|---:|---:|"]
    for c in gpu_comparisons():
        ckpt = "yes" if c["checkpointing"] else "no"
        rows.append(
            f"| {c['record']} | {c['path']} | {c['batch']} × {c['length']} | {ckpt} | {c['planned_mb']:,.0f} "
            f"| {c['measured_mb']:,.0f} |"
        )
    return rows


def cpu_rows() -> list[str]:
    rows = ["| batch | plan MiB | measured MiB | plan / measured |", "|---|---:|---:|---:|"]
    for batch, length in CPU_SHAPES:
        planned, measured = cpu_comparison(batch, length, REPO / "runs" / f"plan-accuracy-{batch}x{length}")
        rows.append(f"| {batch} × {length} | {planned:,.0f} | {measured:,.0f} | {planned / measured:.2f} |")
    return rows


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "gpu"
    print("\n".join(gpu_rows() if which == "gpu" else cpu_rows()))
