"""Evaluation of a (staged) model on a multiple-choice task.

`score` compares the log-probabilities of the choices' first tokens at the last prompt position
(lm-evaluation-harness style), one forward pass per batch with the LM head at that position only.
`generate` decodes greedily and parses the answer, for parity with generation-based papers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from heft.pipeline import HeftModel
from heft.tasks import EncodedExample, Task


@dataclass
class Prediction:
    label: int
    predicted: int
    probs: list[float]
    """Probabilities of the choices, renormalised over the choices."""


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to a (B, T) tensor on `side`; returns input ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _batches(examples: Sequence[EncodedExample], batch_size: int) -> list[list[int]]:
    """Index batches sorted by prompt length, so padding is minimal; results are re-ordered after."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_len)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def autocast(model: HeftModel, bf16: bool) -> torch.autocast:
    """The autocast context training used, so evaluation from a run folder scores identically."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def predict(
    model: HeftModel,
    task: Task,
    examples: Sequence[EncodedExample],
    batch_size: int = 16,
    progress: bool = True,
    bf16: bool = False,
) -> list[Prediction]:
    """Choice probabilities for every example, in input order."""
    choice_ids = torch.tensor(task.choice_token_ids(model.tokenizer))
    pad_id = model.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    results: list[Prediction | None] = [None] * len(examples)
    for batch in tqdm(_batches(examples, batch_size), desc="eval", disable=not progress, leave=False):
        ids, mask = pad_batch([examples[i].input_ids[: examples[i].prompt_len] for i in batch], pad_id, "right")
        with autocast(model, bf16):
            logprobs = model.next_token_logprobs(ids.to(model.device), mask.to(model.device))
        logprobs = logprobs[:, choice_ids.to(model.device)]
        probs = torch.softmax(logprobs, dim=-1).cpu()
        for row, i in enumerate(batch):
            results[i] = Prediction(examples[i].label, int(probs[row].argmax()), probs[row].tolist())
    model.train(was_training)
    return results  # type: ignore[return-value]


def metrics(predictions: Sequence[Prediction], num_choices: int) -> dict[str, float | int | list[float]]:
    """Accuracy, majority-class accuracy, per-class accuracy, mean margin P(gold) − P(best other), and
    which examples were right ("0"/"1" per example, in input order) for paired comparisons."""
    n = len(predictions)
    counts = Counter(p.label for p in predictions)
    per_class = [
        sum(p.predicted == c for p in predictions if p.label == c) / counts[c] if counts[c] else float("nan")
        for c in range(num_choices)
    ]
    margins = [p.probs[p.label] - max(q for j, q in enumerate(p.probs) if j != p.label) for p in predictions]
    return {
        "accuracy": sum(p.predicted == p.label for p in predictions) / n,
        "majority_accuracy": max(counts.values()) / n,
        "per_class_accuracy": per_class,
        "mean_margin": sum(margins) / n,
        "correct": "".join("1" if p.predicted == p.label else "0" for p in predictions),
        "n": n,
    }


def evaluate(model: HeftModel, task: Task, examples: Sequence[EncodedExample], **options) -> dict:
    """Score-based evaluation: metrics over `examples` (`options` as for `predict`)."""
    return metrics(predict(model, task, examples, **options), len(task.choices))


@torch.no_grad()
def generate_answers(
    model: HeftModel,
    task: Task,
    examples: Sequence[EncodedExample],
    batch_size: int = 16,
    max_new_tokens: int = 4,
    bf16: bool = False,
) -> list[tuple[str, int | None]]:
    """Greedy generation from each prompt; returns (text, parsed label or None)."""
    pad_id = model.tokenizer.pad_token_id
    outputs: list[tuple[str, int | None] | None] = [None] * len(examples)
    for batch in _batches(examples, batch_size):
        ids, mask = pad_batch([examples[i].input_ids[: examples[i].prompt_len] for i in batch], pad_id, "left")
        with autocast(model, bf16):
            generated = model.generate(ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
        for row, i in enumerate(batch):
            text = model.tokenizer.decode(generated[row, ids.shape[1] :], skip_special_tokens=True)
            outputs[i] = (text, task.parse_generation(text))
    return outputs  # type: ignore[return-value]


def generation_metrics(outputs: Sequence[tuple[str, int | None]], examples: Sequence[EncodedExample]) -> dict:
    """Accuracy of parsed generations; unparseable answers count as wrong and are reported."""
    n = len(examples)
    return {
        "accuracy": sum(parsed == ex.label for (_, parsed), ex in zip(outputs, examples)) / n,
        "unparsed": sum(parsed is None for _, parsed in outputs),
        "n": n,
    }
