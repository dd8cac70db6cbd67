"""Continuation scoring with the prompt run once and its keys/values reused (heft) against the plain
way (every choice its own prompt + continuation row): the same questions and batches, the scores
compared, the wall time of each (median of alternating repeats).

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python docs/results/zero-shot-mc/bench_prompt_reuse.py \
        --model smollm2-135m --task arc_easy --questions 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from heft.config import DataConfig
from heft.evaluate import continuation_logprobs, pad_batch
from heft.pipeline import HeftModel
from heft.tasks import get_task

Scorer = Callable[[HeftModel, Sequence[list[int]], Sequence[Sequence[list[int]]]], list[list[float]]]


@torch.no_grad()
def full_sequences(
    model: HeftModel, prompts: Sequence[list[int]], continuations: Sequence[Sequence[list[int]]]
) -> list[list[float]]:
    """The baseline: one row per choice holding prompt + continuation, so each prompt runs once per
    choice; the LM head runs at the continuation's positions only, as in heft's own scoring."""
    rows = [(p, c) for p, conts in zip(prompts, continuations) for c in conts]
    ids, mask = pad_batch([p + c for p, c in rows], model.tokenizer.pad_token_id, "right")
    position = torch.arange(ids.shape[1]).unsqueeze(0)
    prompt_len = torch.tensor([len(p) for p, _ in rows]).unsqueeze(1)
    hidden = model(ids, mask, prompt_mask=(position < prompt_len) & mask.bool()).hidden_states
    predicts = (position >= prompt_len - 1) & (
        position < mask.sum(dim=1, keepdim=True) - 1
    )  # positions before a continuation token
    logprobs = torch.log_softmax(model.lm_head(hidden[predicts]).float(), dim=-1)
    targets = torch.cat([torch.tensor(c) for _, c in rows])
    picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).double()
    totals = torch.zeros(len(rows), dtype=torch.float64).index_add(0, predicts.nonzero()[:, 0], picked)
    out, start = [], 0
    for conts in continuations:
        out.append(totals[start : start + len(conts)].tolist())
        start += len(conts)
    return out


def run(model: HeftModel, batches: list[tuple[list, list]], score: Scorer) -> tuple[float, list[list[float]]]:
    start = time.perf_counter()
    scores = [s for prompts, conts in batches for s in score(model, prompts, conts)]
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--questions", type=int, default=128, help="first N test questions")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per batch (as eval_batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = HeftModel.from_pretrained(args.model).eval()
    task = get_task(args.task)
    examples = task.load_split(DataConfig(), task.default_eval_split)[: args.questions]
    encoded, _ = task.encode(examples, model.tokenizer, 512)
    encoded.sort(key=lambda e: e.prompt_len)  # as evaluate batches them
    batches = [
        (
            [e.input_ids[: e.prompt_len] for e in encoded[i : i + args.batch_size]],
            [e.choice_ids for e in encoded[i : i + args.batch_size]],
        )
        for i in range(0, len(encoded), args.batch_size)
    ]
    scorers: dict[str, Scorer] = {"prompt reuse": continuation_logprobs, "full sequences": full_sequences}
    times: dict[str, list[float]] = {name: [] for name in scorers}
    scores = {}
    run(model, batches[:1], continuation_logprobs)  # warm-up
    for _ in range(args.repeats):
        for name, score in scorers.items():
            seconds, scores[name] = run(model, batches, score)
            times[name].append(seconds)
    diff = max(abs(a - b) for x, y in zip(*scores.values()) for a, b in zip(x, y))
    tokens = {
        "prompt reuse": sum(e.prompt_len + sum(len(c) - 1 for c in e.choice_ids) for e in encoded),
        "full sequences": sum(len(e.choice_ids) * e.prompt_len + sum(len(c) for c in e.choice_ids) for e in encoded),
    }
    print(
        json.dumps(
            {
                "model": args.model,
                "task": args.task,
                "questions": len(encoded),
                "choices": sum(len(e.choice_ids) for e in encoded),
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "tokens_forwarded": tokens,
                "seconds": {name: round(statistics.median(t), 3) for name, t in times.items()},
                "all_seconds": {name: [round(s, 3) for s in t] for name, t in times.items()},
                "speed_up": round(
                    statistics.median(times["full sequences"]) / statistics.median(times["prompt reuse"]), 2
                ),
                "max_abs_score_difference": diff,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
