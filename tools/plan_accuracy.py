"""`heft plan`'s peaks beside measured ones: the tables of docs/results/plan/README.md.

    python tools/plan_accuracy.py gpu        # the committed H200 bench records against their plans
    python tools/plan_accuracy.py cpu        # heft train's recipe on smollm2 at 4 × 128 and 8 × 256 (minutes)

The same comparisons as tests/test_memory_plan.py, printed as Markdown tables instead of asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from heft.bench import stage_config
from heft.config import RunConfig, load_config
from heft.memory_plan import Device, plan_run

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "docs" / "results" / "bench"
CPU_SHAPES = ((4, 128), (8, 256))


def gpu_rows() -> list[str]:
    """One row per path of each warm H200 record (compile off): planned and measured peak in MiB."""
    rows = []
    for path in sorted(BENCH.glob("gpu-h200-warm-*.json")):
        record = json.loads(path.read_text())
        if record["settings"].get("compile"):
            continue
        batch, length = record["data"]["batch_size"], record["data"]["max_length"]
        checkpointing = bool(record["settings"].get("activation_checkpointing"))
        for name in ("lora", "loreft", "joint"):
            if name not in record["paths"]:
                continue
            cfg = RunConfig(batch_size=batch, max_length=length, bf16=True, stages=[stage_config(name)])
            stage = plan_run(cfg, Device("cuda", None, "H200"), alternatives=False).stages[0]
            planned = (stage.peak_checkpointed if checkpointing else stage.peak) / 2**20
            measured = record["paths"][name]["peak_memory_mb"]
            ckpt = "yes" if checkpointing else "no"
            rows.append(f"| {path.name} | {name} | {batch} × {length} | {ckpt} | {planned:,.0f} | {measured:,.0f} |")
    head = "| record | path | batch | ckpt | plan MiB | measured MiB |\n|---|---|---|---|---:|---:|"
    return [head, *rows]


def cpu_rows() -> list[str]:
    """heft train's recipe in a fresh process per shape: its peak RSS above the RSS before loading."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    rows = ["| batch | plan MiB | measured MiB | plan / measured |", "|---|---:|---:|---:|"]
    for batch, length in CPU_SHAPES:
        out = REPO / "runs" / f"plan-accuracy-{batch}x{length}"
        script = [sys.executable, str(REPO / "tests" / "plan_measure_script.py"), str(out), str(batch), str(length)]
        done = subprocess.run(script, env=env, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])["above_mb"]
        cfg = load_config(REPO / "configs" / "boolq_heft.yaml", [f"batch_size={batch}", f"max_length={length}"])
        planned = plan_run(cfg, Device("cpu", None, "cpu"), alternatives=False).peak / 2**20
        rows.append(f"| {batch} × {length} | {planned:,.0f} | {measured:,.0f} | {planned / measured:.2f} |")
    return rows


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "gpu"
    print("\n".join(gpu_rows() if which == "gpu" else cpu_rows()))
