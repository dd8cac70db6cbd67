"""Batching and splits: the run's examples carved into train / evaluation / dev, then padded into batches.

Training, evaluation, the benchmark and the Python API all batch through here, so that a batch of
the same examples is the same tensor wherever it is formed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from heft.tasks import EncodedExample, Example, Task
from heft.tasks.data import DataError, subsample

if TYPE_CHECKING:
    from heft.config import RunConfig

log = logging.getLogger("heft")

T = TypeVar("T")


# --------------------------------------------------------------------------------------- batching
CUDA_PAD_MULTIPLE = 64
"""Batch widths on CUDA are rounded up to a multiple of this (`pad_to_multiple_of: auto`): CUDA graphs
(`compile: reduce-overhead`) record one graph per shape, and at most max_length / 64 widths occur."""


def pad_multiple(setting: int | str | None, device: torch.device) -> int:
    """The `pad_to_multiple_of` setting as a number: `auto` is CUDA_PAD_MULTIPLE on CUDA and 1 elsewhere
    (the CPU gains nothing from fixed shapes and pays for every padded position); None is 1."""
    if setting == "auto":
        return CUDA_PAD_MULTIPLE if device.type == "cuda" else 1
    return int(setting or 1)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to a (B, T) tensor on `side`, T the longest list rounded up to `multiple`;
    returns input ids and attention mask."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def collate(
    examples: Sequence[EncodedExample], pad_id: int, padding_side: str = "right", pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Pad a batch (its width a multiple of `pad_to_multiple_of`); mark prompt tokens (where ReFT may
    intervene) and target tokens (the loss). Extra padding changes neither: it is masked out of both."""
    input_ids, attention_mask = pad_batch([e.input_ids for e in examples], pad_id, padding_side, pad_to_multiple_of)
    width = input_ids.shape[1]
    lengths = torch.tensor([len(e.input_ids) for e in examples]).unsqueeze(1)
    prompt_lens = torch.tensor([e.prompt_len for e in examples]).unsqueeze(1)
    offset = width - lengths if padding_side == "left" else torch.zeros_like(lengths)
    rel = torch.arange(width).unsqueeze(0) - offset
    prompt_mask = (rel >= 0) & (rel < prompt_lens)
    labels = input_ids.masked_fill(~((rel >= prompt_lens) & (rel < lengths)), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask, "labels": labels}


def fixed_batches(examples: Sequence[EncodedExample], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """`examples` collated in order, `batch_size` at a time: the same batches at every call."""
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, group: int = 32) -> list[list[int]]:
    """Shuffle, sort within windows of `group` batches by length, then shuffle the batches.

    Batches hold examples of similar length (little padding) while the order stays random.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------- splits
def split_off(items: Sequence[T], n: int, seed: int) -> tuple[list[T], list[T]]:
    """A stratified sample of `n` items and the rest, both in their original order."""
    chosen = set(subsample(range(len(items)), n, seed, label=lambda i: items[i].label))
    return [x for i, x in enumerate(items) if i in chosen], [x for i, x in enumerate(items) if i not in chosen]


def held_out_size(n_train: int) -> int:
    """Evaluation examples held out of a training split when the data has no other split and
    `max_eval_examples` is unset: a tenth, at least one, leaving at least one to train on."""
    return max(1, min(round(n_train / 10), n_train - 1))


@dataclass
class Splits:
    """Encoded examples of a run: training, evaluation and the optional dev split of the gate."""

    train: list[EncodedExample]
    evaluation: list[EncodedExample]
    dev: list[EncodedExample]
    info: dict


@dataclass
class RowSplits:
    """Rendered examples of a run, not yet tokenised: read and validated before the model loads."""

    train: list[Example]
    evaluation: list[Example]
    dev: list[Example]
    eval_split: str
    """The split `evaluation` came from, as the task resolved it (`Task.eval_split`)."""


def load_data(task: Task, cfg: RunConfig, tokenizer) -> Splits:
    """Read and tokenise the splits (`read_splits`, then `encode_splits`)."""
    return encode_splits(task, cfg, read_splits(task, cfg), tokenizer)


def read_splits(task: Task, cfg: RunConfig) -> RowSplits:
    """Read, validate and subsample the splits; needs no tokenizer, so bad data fails fast.

    Held-out examples never reach training: the dev split (`data.dev_examples`), and the evaluation
    examples when they come from the training split, are carved out before `max_train_examples`.
    """
    data = cfg.data
    eval_split = task.eval_split(data)
    train_rows = task.load_split(data, data.train_split, None, cfg.seed)
    if eval_split == data.train_split:
        held_out = cfg.max_eval_examples or held_out_size(len(train_rows))
        if data.eval_split is None:
            log.warning(
                "%s holds no evaluation split: evaluating on %d examples held out of %r; set data.eval_split "
                "to choose one",
                task.describe_source(data),
                held_out,
                data.train_split,
            )
        eval_rows, train_rows = split_off(train_rows, held_out, cfg.seed)
    else:
        eval_rows = task.load_split(data, eval_split, cfg.max_eval_examples, cfg.seed)
    dev_rows: list = []
    if data.dev_examples is not None:
        dev_rows, train_rows = split_off(train_rows, data.dev_examples, cfg.seed)
    if cfg.max_train_examples is not None:
        train_rows = subsample(train_rows, cfg.max_train_examples, cfg.seed)
    if not train_rows:
        raise DataError(
            f"{task.describe_source(data)}: no training examples left after the held-out splits",
            hint="lower max_eval_examples or data.dev_examples, or add training rows",
        )
    return RowSplits(train_rows, eval_rows, dev_rows, eval_split)


def encode_splits(task: Task, cfg: RunConfig, rows: RowSplits, tokenizer) -> Splits:
    """Tokenise the splits; report truncation and where the data came from."""
    data = cfg.data
    train, train_truncated = task.encode(rows.train, tokenizer, cfg.max_length)
    evaluation, eval_truncated = task.encode(rows.evaluation, tokenizer, cfg.max_length)
    dev, _ = task.encode(rows.dev, tokenizer, cfg.max_length)
    info = {
        "source": task.describe_source(data),
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "eval_split": rows.eval_split + (" (held out of training)" if rows.eval_split == data.train_split else ""),
        "dev_examples": len(dev),
        "train_truncated": train_truncated,
        "eval_truncated": eval_truncated,
    }
    log.info("data: %s", info)
    return Splits(train, evaluation, dev, info)
