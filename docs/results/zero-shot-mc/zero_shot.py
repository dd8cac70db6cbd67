"""Zero-shot acc and acc_norm of a model without stages on the multiple-choice test sets, scored
exactly as `heft train` and `heft eval` score them; one JSON line per task (and template).

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python docs/results/zero-shot-mc/zero_shot.py \
        > docs/results/zero-shot-mc/zero_shot.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

from heft.config import DataConfig
from heft.evaluate import evaluate
from heft.pipeline import HeftModel
from heft.tasks import get_task

LM_EVAL_OPENBOOKQA = "{question}"
"""lm-eval's `openbookqa` prompt: the bare question stem (its ARC prompt is heft's default)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "openbookqa"])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model = HeftModel.from_pretrained(args.model).eval()
    runs = [(name, None) for name in args.tasks] + (
        [("openbookqa", LM_EVAL_OPENBOOKQA)] if "openbookqa" in args.tasks else []
    )
    for name, template in runs:
        task = get_task(name)
        start = time.perf_counter()
        examples = task.load_split(DataConfig(template=template), task.default_eval_split)
        encoded, truncated = task.encode(examples, model.tokenizer, 512)
        result = evaluate(model, task, encoded, batch_size=args.batch_size, progress=False)
        print(
            json.dumps(
                {
                    "model": args.model,
                    "task": name,
                    "split": task.default_eval_split,
                    "template": template or task.template,
                    "truncated": truncated,
                    **{k: result[k] for k in ("n", "acc", "acc_norm", "headline", "majority_accuracy")},
                    "seconds": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
