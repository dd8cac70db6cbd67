"""The measured side of `tests/test_memory_plan.py`: `heft train`'s recipe on smollm2 at one batch shape.

    python tests/plan_measure_script.py OUT BATCH_SIZE MAX_LENGTH

Writes BoolQ rows whose passages are longer than MAX_LENGTH (every example is truncated to it, so
every batch is BATCH_SIZE × MAX_LENGTH, the shape a plan assumes), trains configs/boolq_heft.yaml's
stages for one epoch of one batch each, and prints JSON: the resident set before the model loads
(after the imports, which a plan does not count), the run's peak RSS from results.json, and the
difference. Run in its own process, so that no earlier test's memory is in the peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from heft.config import load_config
from heft.sysinfo import reset_peak_memory
from heft.train import run_training

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "river",
    "runs",
    "past",
    "the",
    "old",
    "mill",
    "and",
    "the",
    "town",
    "keeps",
    "its",
    "bridge",
    "in",
    "good",
    "repair",
]


def long_rows(n: int) -> list[dict]:
    """`n` BoolQ rows of 600-word passages (far beyond any max_length the test plans)."""
    return [
        {
            "question": f"is the river {WORDS[i % len(WORDS)]}",
            "passage": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(600)),
            "answer": bool(i % 2),
        }
        for i in range(n)
    ]


def main(out: Path, batch_size: int, max_length: int) -> dict:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        pd.DataFrame(long_rows(4 * batch_size)).to_parquet(data / f"{split}.parquet")
    overrides = [
        f"batch_size={batch_size}",
        f"max_length={max_length}",
        f"max_train_examples={batch_size}",
        f"max_eval_examples={batch_size}",
        "eval_zero_shot=false",
        "boundary_examples=0",
        "stages.0.epochs=1",
        f"data.source={data}",
    ]
    cfg = load_config(REPO / "configs" / "boolq_heft.yaml", overrides)
    baseline = reset_peak_memory()
    results = run_training(cfg, out / "run", show_progress=False)
    return {
        "baseline_mb": baseline,
        "peak_mb": results["peak_memory_mb"],
        "above_mb": results["peak_memory_mb"] - baseline,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
