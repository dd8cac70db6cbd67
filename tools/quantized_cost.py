"""What a quantized base costs HEFT: accuracy (paired), peak memory and speed at bf16, 4-bit and 8-bit,
and both choices at the LoRA → LoReFT boundary (merge into the quantized weights, or keep the adapter).

    python tools/quantized_cost.py run OUT_DIR [--jobs 2] [--train 256] [--eval 200] [--tasks T,..] [--arms A,..]
    python tools/quantized_cost.py summarize OUT_DIR [--json docs/results/quantized/arms.json]

`run` trains every arm with `heft train` in its own process on one torch thread (on a CPU shared with
other jobs, more threads mostly wait for each other) and records that process's CPU time and peak
RSS; arms already finished are skipped, so rerunning continues. `summarize` prints the Markdown
tables of docs/results/quantized/README.md and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from heft.stats import paired_comparison

TASKS = {"arc_easy": "configs/arc_easy_heft.yaml", "boolq": "configs/boolq_heft.yaml"}
ARMS = {
    "bf16": [],
    "4bit-merge": ["quantize.bits=4", "stages.0.lora.merge=true"],
    "4bit-keep": ["quantize.bits=4", "stages.0.lora.merge=false"],
    "8bit-merge": ["quantize.bits=8", "stages.0.lora.merge=true"],
    "8bit-keep": ["quantize.bits=8", "stages.0.lora.merge=false"],
}
"""Every arm's weights are bfloat16 (the quantized arms: the layers left unquantized) under bf16 autocast."""


def command(task: str, arm: str, out: Path, train: int, evaluate: int) -> list[str]:
    common = [
        "dtype=bfloat16",
        f"max_train_examples={train}",
        f"max_eval_examples={evaluate}",
        "stages.0.epochs=1",
        "eval_every=stage",
    ]
    heft = str(Path(sys.executable).with_name("heft"))
    return [heft, "train", TASKS[task], *common, *ARMS[arm], "--output-dir", str(out), "-q"]


def run_arm(task: str, arm: str, root: Path, train: int, evaluate: int) -> str:
    """Train one arm unless it finished; its CPU time and peak RSS go to cost.json beside results.json."""
    out = root / task / arm
    if (out / "cost.json").is_file():
        return f"{task}/{arm}: done before"
    argv = command(task, arm, out, train, evaluate)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # the log claims the arm, so that two drivers on one folder never train the same arm
        log = open(root / task / f"{arm}.log", "x")  # noqa: SIM115 (closed by the with below)
    except FileExistsError:
        return f"{task}/{arm}: claimed by another driver, or failed (delete {arm}.log to run it again)"
    with log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        return f"{task}/{arm}: FAILED (exit status {status}, see {root / task / arm}.log)"
    cost = {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "threads": 1,
        "command": "OMP_NUM_THREADS=1 " + " ".join(argv),
    }
    (out / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    return f"{task}/{arm}: {cost['cpu_s']} CPU s"


def read_arm(folder: Path) -> dict:
    """The numbers of one finished arm: accuracies and which examples were right, losses, cost."""
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((folder / "results.json").read_text())
    cost = json.loads((folder / "cost.json").read_text())
    evals = [m for m in lines if m["kind"] == "eval"]
    after_lora = next(m for m in evals if m["stage_index"] == 0)
    lora_end = next(m for m in lines if m["kind"] == "stage_end" and m["stage_index"] == 0)
    final_end = [m for m in lines if m["kind"] == "stage_end"][-1]
    return {
        "zero_shot": evals[0]["eval_accuracy"],
        "after_lora": after_lora["eval_accuracy"],
        "final": evals[-1]["eval_accuracy"],
        "correct_after_lora": after_lora["eval_correct"],
        "correct_final": evals[-1]["eval_correct"],
        "lora_loss_before_merge": lora_end.get("loss_before_merge"),
        "lora_loss_after_merge": lora_end["boundary_loss"],
        "final_loss": final_end["boundary_loss"],
        "peak_memory_mb": results["peak_memory_mb"],
        "cpu_s": cost["cpu_s"],
        "tokens": results["train_tokens"] + results["eval_tokens"],
        "tok_per_cpu_s": round((results["train_tokens"] + results["eval_tokens"]) / cost["cpu_s"], 1),
        "wall_s": results["wall_time_s"],
        "command": cost["command"],
    }


def _points(comparison) -> str:
    c = comparison
    return (
        f"{100 * c.difference:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}] ({c.test} p = {c.p:.2g}, "
        f"{c.a_only}/{c.b_only}, n = {c.examples})"
    )


def summarize(root: Path) -> tuple[str, dict]:
    """Markdown tables per task and the JSON record."""
    text, record = [], {}
    for task in TASKS:
        arms = {arm: read_arm(root / task / arm) for arm in ARMS if (root / task / arm / "cost.json").is_file()}
        if "bf16" not in arms:
            continue
        base = arms["bf16"]
        text += [
            f"### {task}",
            "",
            "| arm | accuracy zero-shot → after LoRA → final | final vs bf16, points [95 % CI] (test p, "
            "a-only/b-only, n) | probe loss end of LoRA → after merge | final probe loss | peak RSS MB | CPU s | "
            "tokens / CPU s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        comparisons = {}
        for arm, r in arms.items():
            versus = paired_comparison([r["correct_final"]], [base["correct_final"]]) if arm != "bf16" else None
            comparisons[f"{arm} vs bf16 (final)"] = versus.to_dict() if versus else None
            text.append(
                f"| {arm} | {100 * r['zero_shot']:.1f} → {100 * r['after_lora']:.1f} → {100 * r['final']:.1f} | "
                f"{_points(versus) if versus else '—'} | {r['lora_loss_before_merge']:.4f} → "
                f"{r['lora_loss_after_merge']:.4f} | {r['final_loss']:.4f} | {r['peak_memory_mb']:,.0f} | "
                f"{r['cpu_s']:,.0f} | {r['tok_per_cpu_s']:,.0f} |"
            )
        text += ["", "Merge into the quantized base vs keep the adapter (same LoRA training, paired):", ""]
        for bits in ("4bit", "8bit"):
            merge, keep = arms.get(f"{bits}-merge"), arms.get(f"{bits}-keep")
            if merge is None or keep is None:
                continue
            for when in ("after_lora", "final"):
                c = paired_comparison([merge[f"correct_{when}"]], [keep[f"correct_{when}"]])
                comparisons[f"{bits} merge vs keep ({when})"] = c.to_dict()
                text.append(f"- {bits}, {when.replace('_', ' ')}: merge − keep = {_points(c)}")
        text.append("")
        record[task] = {
            "arms": {a: {k: v for k, v in r.items() if not k.startswith("correct")} for a, r in arms.items()},
            "comparisons": comparisons,
        }
    return "\n".join(text), record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("out", type=Path)
    run.add_argument("--jobs", type=int, default=2)
    run.add_argument("--train", type=int, default=256)
    run.add_argument("--eval", type=int, default=200)
    run.add_argument("--tasks", default=",".join(TASKS))
    run.add_argument("--arms", default=",".join(ARMS), help="comma-separated, run in this order")
    report = sub.add_parser("summarize")
    report.add_argument("out", type=Path)
    report.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        tasks, arms = args.tasks.split(","), args.arms.split(",")
        unknown = sorted(set(tasks) - TASKS.keys()) + sorted(set(arms) - ARMS.keys())
        if unknown:
            known = f"tasks: {', '.join(TASKS)}; arms: {', '.join(ARMS)}"
            parser.error(f"unknown task or arm {', '.join(unknown)}; {known}")
        jobs = [(task, arm) for task in tasks for arm in arms]
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda job: run_arm(*job, args.out, args.train, args.eval), jobs):
                print(line, flush=True)
    else:
        text, record = summarize(args.out)
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
