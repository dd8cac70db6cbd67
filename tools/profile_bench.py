"""Profile `heft bench`'s paths with torch.profiler (CPU, bf16 autocast as training uses it).

For each path: one untimed warm-up step, then `--steps` profiled steps on the bench's own BoolQ
batches. Prints per path the wall time per step, the number of profiler events (ops) per step,
the self-CPU time per op category and the top ops by self CPU time.

    PYTHONPATH=src HEFT_DATA_DIR=... python tools/profile_bench.py --paths lora,peft-lora --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from heft import bench
from heft.data import collate

CATEGORIES = (
    (
        "GEMM",
        ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int8pack_mm", "mkldnn", "onednn"),
    ),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("copy / cast", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to")),
    (
        "fill / alloc",
        ("aten::fill_", "aten::zero_", "aten::empty", "aten::zeros", "aten::ones", "aten::full", "aten::resize_"),
    ),
    ("dropout", ("dropout", "aten::bernoulli", "aten::native_dropout", "aten::random_")),
    ("optimizer", ("Optimizer", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    (
        "loss / softmax",
        (
            "aten::_log_softmax",
            "aten::nll_loss",
            "aten::cross_entropy",
            "aten::_softmax",
            "softmax_backward",
            "log_softmax_backward",
        ),
    ),
    ("norm", ("rsqrt", "aten::pow", "aten::mean")),
    (
        "elementwise",
        (
            "aten::mul",
            "aten::add",
            "aten::silu",
            "aten::sub",
            "aten::div",
            "aten::neg",
            "aten::cat",
            "aten::where",
            "silu_backward",
            "aten::sum",
            "aten::masked",
            "aten::gather",
            "aten::scatter",
            "aten::index",
        ),
    ),
)


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other"


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--paths", default=",".join(bench.PATHS))
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--batch-index",
        type=int,
        help="warm up on and profile only this batch (one width, e.g. a typical one; default: the others in turn)",
    )
    return ap.parse_args()


def print_profile(path: str, prof: profile, steps: list[int], wall: float, cpu: float, tokens: float, top: int) -> None:
    """The step's time per op category and its top ops by self CPU time, as Markdown tables."""
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    n_ops = sum(e.count for e in events if e.key.startswith("aten::")) / len(steps)
    by_cat: dict[str, float] = defaultdict(float)
    for e in events:
        by_cat[category(e.key)] += e.self_cpu_time_total
    print(
        f"\n## {path}: {wall:.3f} s/step wall, {cpu:.3f} s/step process CPU (profiled), {tokens:.0f} tokens/step, "
        f"{n_ops:.0f} aten ops/step, self CPU {total_self / 1e6 / len(steps):.3f} s/step"
    )
    print("| category | self CPU s/step | share |\n|---|---|---|")
    for label, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {t / 1e6 / len(steps):.3f} | {100 * t / total_self:.1f} % |")
    print("\n| op | calls/step | self CPU s/step | share |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(
            f"| `{e.key}` | {e.count / len(steps):.0f} | {e.self_cpu_time_total / 1e6 / len(steps):.3f} | "
            f"{100 * e.self_cpu_time_total / total_self:.1f} % |"
        )


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = bench.parse_paths(args.paths)
    dev = torch.device("cpu")
    shapes, examples, _, pad_id = bench._boolq_data(
        args.model, args.batches, args.batch_size, args.max_length, args.seed
    )
    n_linear = sum(c * i * o for (i, o), c in shapes.items())
    collated = [collate(ex, pad_id) for ex in examples]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batches: "
        f"{[tuple(b['input_ids'].shape) for b in collated]}"
    )
    for path in paths:
        torch.manual_seed(args.seed)
        work = bench._workload(path, bench.Base(args.model), examples, collated, dev, n_linear, args.seed)
        work.step(args.batch_index or 0)  # warm-up
        steps = [1 + i % (len(collated) - 1) for i in range(args.steps)] if len(collated) > 1 else [0] * args.steps
        if args.batch_index is not None:
            steps = [args.batch_index] * args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start, cpu = time.perf_counter(), time.process_time()
            for i in steps:
                work.step(i)
            wall = (time.perf_counter() - start) / len(steps)
            cpu = (time.process_time() - cpu) / len(steps)
        print_profile(path, prof, steps, wall, cpu, statistics.mean(work.tokens(i) for i in steps), args.top)
        work.close()
        del work, prof


if __name__ == "__main__":
    main()
