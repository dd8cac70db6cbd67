"""Count the ATen ops that one training step of each `heft bench` path dispatches.

On a GPU these steps are bound by the host: each non-view op costs a dispatch and a kernel launch
whatever its size (≈ 20 µs on the H200 host of docs/results/bench), so the op count predicts the
step time there. Counting needs no GPU: the model keeps its architecture (layers, heads, adapters,
interventions) but narrow widths, so the count runs in seconds on a CPU. Views are not counted
(no kernel); the optimizer is left out (one foreach call on CUDA).

    PYTHONPATH=src HEFT_DATA_DIR=../shared/data python tools/count_ops.py --paths lora,loreft,joint
    PYTHONPATH=src HEFT_DATA_DIR=../shared/data python tools/count_ops.py --json   # counts only, as JSON

Gradients are reset (`set_to_none`, as training's `zero_grad` does) before the counted step, so the
count holds no accumulation into gradients left by the warm-up step.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import subprocess
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import heft.pipeline
from heft import bench
from heft.config import RunConfig
from heft.data import collate, load_data
from heft.evaluate import autocast
from heft.models import LoadedModel, load_model
from heft.pipeline import HeftModel
from heft.tasks import get_task

TARGETS = {"lora": 3_500, "loreft": 4_000, "joint": 6_000}
"""Issue 21's ceilings on ops per training step at the default shapes (smollm2, 16 × 64)."""


class CountOps(TorchDispatchMode):
    """Non-view ops dispatched inside the block, with the innermost library frame that issued each."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.sources: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view):  # views launch no kernel
            self.total += 1
            frames = [
                f
                for f in traceback.extract_stack()[:-1]
                if "/torch/" not in f.filename or "functional.py" in f.filename
            ]
            where = (
                f"{frames[-1].filename.rsplit('site-packages/', 1)[-1]}:{frames[-1].lineno}" if frames else "autograd"
            )
            self.sources[(func.overloadpacket.__name__, where)] += 1
        return func(*args, **(kwargs or {}))


def narrow(loaded: LoadedModel, hidden: int = 64) -> HeftModel:
    """A fresh model of `loaded`'s architecture and tokenizer with hidden size `hidden` (random weights)."""
    config = copy.deepcopy(loaded.model.config)
    config.hidden_size, config.intermediate_size, config.head_dim = hidden, 2 * hidden, hidden // 4
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    return HeftModel(
        LoadedModel(
            AutoModelForCausalLM.from_config(config), loaded.tokenizer, loaded.model_id, loaded.weights_sha256, []
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--paths", default="lora,loreft,joint")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--top", type=int, default=12, help="forward op sources to list per path")
    ap.add_argument("--json", action="store_true", help="print the counts as one JSON object instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    heft.pipeline.SHORT_CPU_SEQUENCE = 0  # the attention kernel a GPU runs (flash), not the CPU's math one
    loaded = load_model(args.model)
    cfg = RunConfig(
        model=args.model,
        task="boolq",
        max_length=args.max_length,
        max_train_examples=args.batch_size,
        max_eval_examples=args.batch_size,
        seed=42,
    )
    batch = collate(
        load_data(get_task("boolq"), cfg, loaded.tokenizer).train[: args.batch_size], loaded.tokenizer.pad_token_id
    )
    counts = {}
    for path in args.paths.split(","):
        forward, backward = count_step(narrow(loaded), path, batch)
        counts[path] = {"forward": forward.total, "backward": backward.total, "total": forward.total + backward.total}
        if not args.json:
            print(
                f"## {path}: {forward.total} forward + {backward.total} backward = "
                f"{forward.total + backward.total} ops per step"
            )
            for (op, where), count in forward.sources.most_common(args.top):
                print(f"  {count:5d}  {op:28s} {where}")
    if args.json:
        default_shapes = (args.model, args.batch_size, args.max_length) == ("smollm2-135m", 16, 64)
        targets = {path: TARGETS[path] for path in counts if path in TARGETS} if default_shapes else {}
        print(json.dumps({"setup": setup(args), "ops_per_step": counts, "targets": targets}, indent=2))


def count_step(model: HeftModel, path: str, batch: dict[str, torch.Tensor]) -> tuple[CountOps, CountOps]:
    """Forward and backward ops of one training step of `path`, after one uncounted step."""
    model.add_stage(bench.stage_config(path), seed=0)
    model.train()
    with model.frozen_weights_bf16():
        with autocast(model, True):  # one untimed step first, as the bench does
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        with CountOps() as forward, autocast(model, True):
            loss = model(**batch).loss
        with CountOps() as backward:
            loss.backward()
    return forward, backward


def setup(args: argparse.Namespace) -> dict:
    """What the counts depend on: shapes, torch and the code's commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": "python tools/count_ops.py " + " ".join(sys.argv[1:]),
        "model": f"{args.model} architecture, hidden size 64 (narrow widths, random weights)",
        "batch": f"{args.batch_size} x {args.max_length} BoolQ training examples, right-padded",
        "torch": torch.__version__,
        "commit": commit,
        "counted": "non-view ATen ops of one forward + backward under bf16 autocast, optimizer excluded",
    }


if __name__ == "__main__":
    main()
