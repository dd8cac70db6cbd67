"""Evaluation of a (staged) model on a multiple-choice task, scored as lm-evaluation-harness does.

First-token tasks (BoolQ) compare the log-probabilities of the choices' first tokens at the last
prompt position: one forward pass per batch, LM head at that position only. Continuation tasks
(ARC, OpenBookQA) sum the log-probabilities of each choice's tokens; the choices of a question
share its prompt, which is run once and whose keys/values every choice reuses.
`generate_answers` decodes greedily and parses the answer, for parity with generation-based papers.
Completion tasks are evaluated by generating (`evaluate_completion`): exact match of greedy responses,
and the mean log-likelihood of the reference responses.

Under `torchrun` or `accelerate launch` every process scores a share of the batches and the results
are gathered onto all processes in input order: each batch is the one a single process would form,
so the predictions are those of a single-process evaluation. Every process must make the call.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from heft.data import pad_batch
from heft.pipeline import HeftModel
from heft.sharding import is_sharded
from heft.tasks import EncodedExample, Task
from heft.tasks.completion import CompletionTask, EncodedCompletion


@dataclass
class Prediction:
    label: int
    predicted: int
    """Argmax of the task's headline score."""
    probs: list[float]
    """Softmax of the headline scores over the example's choices: for first-token tasks the choices'
    probabilities renormalised over the choices, for `acc_norm` over per-character log-likelihoods."""
    predicted_by: dict[str, int] = field(default_factory=dict)
    """Continuation tasks: the prediction under each score (`acc`, `acc_norm`)."""


def _batches(examples: Sequence[EncodedExample], batch_size: int) -> list[list[int]]:
    """Index batches sorted by prompt length, so padding is minimal; results are re-ordered after."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_len)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


R = TypeVar("R")


def process_state() -> PartialState:
    """accelerate's view of the launch (processes, rank, device). Training's `Accelerator` set it up
    already; standalone evaluation creates it with the same CPU rule, so that `torchrun` on a host
    without a GPU gives a gloo process group rather than N unrelated processes."""
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def sharded(
    batches: Sequence[list[int]],
    size: int,
    score: Callable[[list[int]], list[R]],
    desc: str = "eval",
    progress: bool = True,
    split: bool = True,
) -> list[R]:
    """`score` applied to every batch of example indices; the result of example i at position i.

    With several processes each takes every N-th batch (batches are sorted by length, so the shares
    cost about the same), and the per-example results are gathered onto every process. Without
    `split` (a model sharded by FSDP, whose every forward is a collective) every process scores
    every batch, so all run the same forwards in step.
    """
    state = process_state()
    rank, world = state.process_index, state.num_processes if split else 1
    mine = list(batches)[rank::world] if world > 1 else list(batches)
    results: list[R | None] = [None] * size
    pairs = []
    for batch in tqdm(mine, desc=desc, disable=not progress or not state.is_main_process, leave=False):
        pairs += zip(batch, score(batch))
    for i, result in gather_object(pairs) if world > 1 else pairs:
        results[i] = result
    missing = sum(r is None for r in results)
    if missing:
        raise RuntimeError(f"{missing} of {size} examples got no result")
    return results  # type: ignore[return-value]


def each_example(
    model: HeftModel,
    examples: Sequence[EncodedExample],
    batch_size: int,
    score: Callable[[list[int]], list[R]],
    desc: str = "eval",
    progress: bool = True,
) -> list[R]:
    """`sharded` over `examples` in length-sorted batches; split across processes unless FSDP shards
    the model (then every process runs every batch)."""
    batches = _batches(examples, batch_size)
    return sharded(batches, len(examples), score, desc=desc, progress=progress, split=not is_sharded(model))


def autocast(model: HeftModel, bf16: bool) -> torch.autocast:
    """The autocast context training used, so evaluation from a run folder scores identically."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)


def scored_tokens(examples: Sequence[EncodedExample]) -> int:
    """Tokens one evaluation runs: each prompt once, plus every choice's continuation (multiple choice)."""
    return sum(e.prompt_len + sum(len(ids) for ids in e.choice_ids) for e in examples)


@torch.no_grad()
def predict(
    model: HeftModel,
    task: Task,
    examples: Sequence[EncodedExample],
    batch_size: int = 16,
    progress: bool = True,
    bf16: bool = False,
) -> list[Prediction]:
    """Choice scores for every example, in input order (`batch_size` counts questions)."""
    by_continuation = task.scoring == "continuation"
    choice_ids = None if by_continuation else torch.tensor(task.choice_token_ids(model.tokenizer), device=model.device)
    pad_id = model.tokenizer.pad_token_id
    was_training = model.training
    model.eval()

    def score(batch: list[int]) -> list[Prediction]:
        prompts = [examples[i].input_ids[: examples[i].prompt_len] for i in batch]
        if by_continuation:
            with autocast(model, bf16):
                lls = continuation_logprobs(model, prompts, [examples[i].choice_ids for i in batch])
            return [_continuation_prediction(examples[i], lls[row], task.headline) for row, i in enumerate(batch)]
        ids, mask = pad_batch(prompts, pad_id, "right")
        with autocast(model, bf16):
            logprobs = model.next_token_logprobs(ids.to(model.device), mask.to(model.device))
        probs = torch.softmax(logprobs[:, choice_ids], dim=-1).cpu()
        return [
            Prediction(examples[i].label, int(probs[row].argmax()), probs[row].tolist()) for row, i in enumerate(batch)
        ]

    try:
        with model.frozen_weights_bf16(bf16):  # cast the frozen weights once for the whole set, not at every forward
            return each_example(model, examples, batch_size, score, progress=progress)
    finally:
        model.train(was_training)


def _continuation_prediction(example: EncodedExample, lls: list[float], headline: str) -> Prediction:
    """`acc` ranks choices by log-likelihood, `acc_norm` by log-likelihood per character of the choice."""
    raw = torch.tensor(lls, dtype=torch.float64)
    scores = {"acc": raw, "acc_norm": raw / torch.tensor(example.choice_chars, dtype=torch.float64)}
    predicted_by = {name: int(s.argmax()) for name, s in scores.items()}
    probs = torch.softmax(scores[headline], dim=-1)
    return Prediction(example.label, predicted_by[headline], probs.tolist(), predicted_by)


def continuation_logprobs(
    model: HeftModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    padding_side: str = "right",
) -> list[list[float]]:
    """Log-likelihood of every continuation of every prompt (`continuation_scores` without the greedy flags)."""
    return [[ll for ll, _ in scores] for scores in continuation_scores(model, prompts, continuations, padding_side)]


@torch.no_grad()
def continuation_scores(
    model: HeftModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    padding_side: str = "right",
) -> list[list[tuple[float, bool]]]:
    """Log-likelihood of every continuation of every prompt, the sum of its tokens' log-probabilities,
    and whether greedy decoding would produce it (each of its tokens the argmax; lm-eval's `is_greedy`).

    Each prompt runs once, edited by the model's stages as in training; its keys and values are then
    copied to every continuation of it, which runs on top without any edit. The last prompt position
    predicts a continuation's first token, so one-token continuations need no second pass.
    """
    pad_id = model.tokenizer.pad_token_id
    device = model.device
    ids, mask = (t.to(device) for t in pad_batch(prompts, pad_id, padding_side))
    hidden, cache = model.encode_prompts(ids, mask)
    first = model.last_token_logprobs(hidden, mask)
    owner = torch.tensor([q for q, conts in enumerate(continuations) for _ in conts], device=device)
    rows = [list(c) for conts in continuations for c in conts]
    if any(not c for c in rows):
        raise ValueError("an empty continuation has no log-likelihood")
    first_ids = torch.tensor([c[0] for c in rows], device=device)
    totals = first[owner, first_ids].double()
    misses = (first.argmax(dim=-1)[owner] != first_ids).long()
    if any(len(c) > 1 for c in rows):
        cont_ids, cont_mask = (t.to(device) for t in pad_batch([c[:-1] for c in rows], pad_id, "right"))
        targets, _ = pad_batch([c[1:] for c in rows], pad_id, "right")
        cache.reorder_cache(owner)  # row r continues prompt owner[r]
        steps = torch.arange(cont_ids.shape[1], device=device)
        position_ids = mask.sum(dim=1)[owner].unsqueeze(1) + steps
        attention = torch.cat([mask[owner], cont_mask], dim=1)
        later = model.continue_prompts(cont_ids, attention, position_ids, cache)
        real = cont_mask.bool()
        logprobs = torch.log_softmax(model.lm_head(later[real]).float(), dim=-1)
        wanted = targets.to(device)[real]
        picked = logprobs.gather(1, wanted.unsqueeze(1)).squeeze(1).double()
        row_of = real.nonzero()[:, 0]
        totals = totals.index_add(0, row_of, picked)
        misses = misses.index_add(0, row_of, (logprobs.argmax(dim=-1) != wanted).long())
    scores = list(zip(totals.tolist(), (misses == 0).tolist()))
    out, start = [], 0
    for conts in continuations:
        out.append(scores[start : start + len(conts)])
        start += len(conts)
    return out


def metrics(predictions: Sequence[Prediction]) -> dict[str, float | int | str | list[float]]:
    """Accuracy, majority-class accuracy, per-class accuracy (by gold index), mean margin P(gold) −
    P(best other), which examples were right ("0"/"1" per example, in input order) for paired
    comparisons, and the accuracy under each score of continuation tasks (`acc`, `acc_norm`)."""
    n = len(predictions)
    counts = Counter(p.label for p in predictions)
    num_choices = max(len(p.probs) for p in predictions)
    per_class = [
        sum(p.predicted == c for p in predictions if p.label == c) / counts[c] if counts[c] else float("nan")
        for c in range(num_choices)
    ]
    margins = [p.probs[p.label] - max(q for j, q in enumerate(p.probs) if j != p.label) for p in predictions]
    by_score = {
        name: sum(p.predicted_by[name] == p.label for p in predictions) / n for name in predictions[0].predicted_by
    }
    return {
        "accuracy": sum(p.predicted == p.label for p in predictions) / n,
        **by_score,
        "majority_accuracy": max(counts.values()) / n,
        "per_class_accuracy": per_class,
        "mean_margin": sum(margins) / n,
        "correct": "".join("1" if p.predicted == p.label else "0" for p in predictions),
        "n": n,
    }


def evaluate(model: HeftModel, task: Task, examples: Sequence[EncodedExample], **options) -> dict:
    """Score-based evaluation: metrics over `examples` (`options` as for `predict`). Continuation
    tasks also report `acc` and `acc_norm`, and which of them is `accuracy` (`headline`); completion
    tasks are evaluated by generating (`evaluate_completion`)."""
    if isinstance(task, CompletionTask):
        return evaluate_completion(model, task, examples, **options)
    result = metrics(predict(model, task, examples, **options))
    return {**result, "headline": task.headline} if task.scoring == "continuation" else result


def majority_correct(task: Task, examples: Sequence[EncodedExample]) -> str:
    """Which examples the majority-class baseline gets right ("0"/"1" in input order): always answering
    the evaluation set's most frequent label (completion: reference answer). Its accuracy is the
    `majority_accuracy` of `metrics`; per example, it pairs with a model's `correct` (McNemar)."""
    if isinstance(task, CompletionTask):
        answers = [task.answer(ex.reference) for ex in examples]  # type: ignore[attr-defined]
    else:
        answers = [ex.label for ex in examples]
    top = Counter(answers).most_common(1)[0][0]
    return "".join("1" if answer == top else "0" for answer in answers)


@torch.no_grad()
def generate_answers(
    model: HeftModel,
    task: Task,
    examples: Sequence[EncodedExample],
    batch_size: int = 16,
    max_new_tokens: int = 4,
    bf16: bool = False,
    progress: bool = True,
) -> list[tuple[str, int | None]]:
    """Greedy generation from each prompt; returns (text, parsed label or None)."""
    if task.choices_field is not None:
        raise ValueError(
            f"task {task.name!r} has its own choices per question, which generated text is not parsed "
            "against; evaluate it with --mode score"
        )
    pad_id = model.tokenizer.pad_token_id

    def answer(batch: list[int]) -> list[tuple[str, int | None]]:
        ids, mask = pad_batch([examples[i].input_ids[: examples[i].prompt_len] for i in batch], pad_id, "left")
        with autocast(model, bf16):
            generated = model.generate(
                ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens, do_sample=False
            )
        texts = [model.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in generated]
        return [(text, task.parse_generation(text)) for text in texts]

    return each_example(model, examples, batch_size, answer, desc="generate", progress=progress)


def generation_metrics(outputs: Sequence[tuple[str, int | None]], examples: Sequence[EncodedExample]) -> dict:
    """Accuracy of parsed generations; unparseable answers count as wrong and are reported."""
    n = len(examples)
    return {
        "accuracy": sum(parsed == ex.label for (_, parsed), ex in zip(outputs, examples)) / n,
        "unparsed": sum(parsed is None for _, parsed in outputs),
        "n": n,
    }


@contextlib.contextmanager
def _eval_mode(model: HeftModel) -> Iterator[None]:
    """No dropout inside; the model's mode as it was afterwards (training evaluates between epochs)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class StopStrings(StoppingCriteria):
    """Ends each row of a generation once the text it generated holds a stop string. (transformers'
    `stop_strings` maps every vocabulary entry to text up front, which fails for some tokenizers,
    word-level ones among them; decoding the few generated tokens works with any.)"""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, list(stop_strings), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop_strings) for text in texts], device=input_ids.device)


@torch.no_grad()
def generate_responses(
    model: HeftModel,
    task: CompletionTask,
    examples: Sequence[EncodedExample],
    batch_size: int = 16,
    bf16: bool = False,
    progress: bool = True,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy responses to the examples' prompts, in input order: batches of similar length, left-padded,
    through HF `generate` (KV cache; the interventions edit the prompt positions). A response ends at
    the task's end tokens, a stop string (cut off with what follows) or `max_new_tokens` (default: the task's)."""
    tokenizer = model.tokenizer
    stop_strings = task.stop_strings(tokenizer)
    options = {
        "max_new_tokens": max_new_tokens or task.max_new_tokens,
        "do_sample": False,
        "eos_token_id": task.end_token_ids(tokenizer),
    }

    def answer(batch: list[int]) -> list[str]:
        prompts = [examples[i].input_ids[: examples[i].prompt_len] for i in batch]
        ids, mask = pad_batch(prompts, tokenizer.pad_token_id, "left")
        stop = StoppingCriteriaList([StopStrings(tokenizer, stop_strings, ids.shape[1])] if stop_strings else [])
        with autocast(model, bf16):
            out = model.generate(ids.to(model.device), mask.to(model.device), stopping_criteria=stop, **options)
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [task.cut_response(text, stop_strings) for text in texts]

    with _eval_mode(model), model.frozen_weights_bf16(bf16):
        return each_example(model, examples, batch_size, answer, desc="generate", progress=progress)


@torch.no_grad()
def response_logliks(
    model: HeftModel,
    examples: Sequence[EncodedExample],
    batch_size: int = 16,
    bf16: bool = False,
    progress: bool = True,
) -> list[float]:
    """Log-likelihood of each example's response (its tokens after the prompt, end token included), as
    training scores it: one prompt pass, edited, then the response on its keys and values."""

    def score(batch: list[int]) -> list[float]:
        prompts = [examples[i].input_ids[: examples[i].prompt_len] for i in batch]
        responses = [[examples[i].input_ids[examples[i].prompt_len :]] for i in batch]
        with autocast(model, bf16):
            return [lls[0] for lls in continuation_logprobs(model, prompts, responses)]

    with _eval_mode(model), model.frozen_weights_bf16(bf16):
        return each_example(model, examples, batch_size, score, desc="log-likelihood", progress=progress)


def evaluate_completion(
    model: HeftModel,
    task: CompletionTask,
    examples: Sequence[EncodedCompletion],
    batch_size: int = 16,
    progress: bool = True,
    bf16: bool = False,
) -> dict:
    """Exact match of greedy responses and the reference responses' log-likelihood (`completion_metrics`)."""
    responses = generate_responses(model, task, examples, batch_size, bf16, progress)
    return completion_metrics(task, examples, responses, response_logliks(model, examples, batch_size, bf16, progress))


def completion_metrics(
    task: CompletionTask, examples: Sequence[EncodedCompletion], responses: Sequence[str], logliks: Sequence[float]
) -> dict:
    """`accuracy` is exact match (`task.is_correct`); `majority_accuracy` that of always giving the most
    frequent reference answer; `response_loglik` the mean log-likelihood of a reference response (its
    sum over tokens), `response_loglik_per_token` per response token; `correct` per example, in order."""
    if any(ex.reference is None for ex in examples):
        raise ValueError("evaluating completion needs every example's reference response")
    n = len(examples)
    correct = [task.is_correct(response, ex.reference) for response, ex in zip(responses, examples)]
    answers = Counter(task.answer(ex.reference) for ex in examples)
    response_tokens = sum(len(ex.input_ids) - ex.prompt_len for ex in examples)
    return {
        "accuracy": sum(correct) / n,
        "exact_match": sum(correct) / n,
        "majority_accuracy": max(answers.values()) / n,
        "per_class_accuracy": [],
        "mean_margin": None,
        "response_loglik": sum(logliks) / n,
        "response_loglik_per_token": sum(logliks) / response_tokens,
        "correct": "".join("1" if right else "0" for right in correct),
        "n": n,
        "headline": task.headline,
    }
