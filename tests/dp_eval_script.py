"""Evaluation under several processes; `tests/test_data_parallel.py` launches it with torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/dp_eval_script.py OUT MODEL_DIR DATA_DIR

Every process writes OUT/rank<R>.json with the metrics it holds after evaluating a BoolQ and a
multiple-choice set; then `heft train` runs a zero-shot evaluation and one short stage into OUT/run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from conftest import make_heft
from heft.cli import main
from heft.evaluate import evaluate, predict, process_state
from heft.tasks import get_task


def toy_sets(tokenizer):
    """A BoolQ and an ARC-style set from the tiny tokenizer's words, of sizes that leave the two
    processes unequal shares (5 and 4 batches at the batch sizes the test uses)."""
    words = [
        "yes",
        "no",
        "true",
        "false",
        "the",
        "a",
        "is",
        "of",
        "passage",
        "question",
        "answer",
        "cat",
        "dog",
        "red",
        "blue",
        "green",
        "one",
        "two",
        "three",
        "four",
        "five",
    ]
    boolq, arc = get_task("boolq"), get_task("arc_easy")
    rows = [
        {
            "passage": " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)),
            "question": " ".join(words[(i * 5 + j) % len(words)] for j in range(2 + i % 4)),
            "answer": bool(i % 3),
        }
        for i in range(19)
    ]
    mc_rows = [
        {
            "question": " ".join(words[(i * 3 + j) % len(words)] for j in range(2 + i % 5)),
            "choices": [
                words[(i + k * 4) % len(words)] + (" " + words[k] if (i + k) % 2 else "") for k in range(2 + i % 3)
            ],
            "label": i % 2,
        }
        for i in range(11)
    ]
    encoded, _ = boolq.encode([boolq.to_example(r) for r in rows], tokenizer, 64)
    mc_encoded, _ = arc.encode([arc.to_example(r) for r in mc_rows], tokenizer, 64)
    return (boolq, encoded), (arc, mc_encoded)


def evaluate_sets(model) -> dict:
    (boolq, encoded), (arc, mc_encoded) = toy_sets(model.tokenizer)
    return {
        "boolq": evaluate(model, boolq, encoded, batch_size=4, progress=False),
        "boolq_probs": [p.probs for p in predict(model, boolq, encoded, batch_size=4, progress=False)],
        "mc": evaluate(model, arc, mc_encoded, batch_size=3, progress=False),
        "mc_probs": [p.probs for p in predict(model, arc, mc_encoded, batch_size=3, progress=False)],
    }


def train_config(model_dir: str, data_dir: str) -> dict:
    return {
        "model": model_dir,
        "data": {"source": data_dir},
        "max_length": 32,
        "batch_size": 8,
        "eval_batch_size": 5,
        "stages": [{"method": "lora", "epochs": 1, "lr": 2e-2, "lora": {"r": 4, "dropout": 0.0}}],
    }


if __name__ == "__main__":
    out, model_dir, data_dir = map(Path, sys.argv[1:4])
    state = process_state()
    result = {"num_processes": state.num_processes, **evaluate_sets(make_heft("llama"))}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))
    config = out / "train.yaml"
    if state.is_main_process:
        config.write_text(yaml.safe_dump(train_config(str(model_dir), str(data_dir))))
    state.wait_for_everyone()
    sys.exit(main(["train", str(config), "--output-dir", str(out / "run"), "-q"]))
