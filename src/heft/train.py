"""The training recipe, in one file: data → model → stages (train, evaluate, checkpoint) → results.

Each stage gets its own AdamW optimizer and schedule. Batches are length-grouped and padded
dynamically; the loss covers target tokens only. `accelerate` provides devices, DDP/FSDP,
mixed precision and gradient accumulation, so `accelerate launch -m heft train ...` scales out.
Every completed epoch is a checkpoint: an interrupted run resumes from its last epoch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from heft.config import ConfigError, RunConfig, StageConfig, save_config
from heft.evaluate import autocast, evaluate, pad_batch, scored_tokens
from heft.io import (
    append_jsonl,
    atomic_write_text,
    load_optimizer,
    load_run,
    read_trainer_state,
    run_folder_lock,
    save_run,
    write_json,
)
from heft.pipeline import HeftModel
from heft.provenance import run_provenance
from heft.sysinfo import device_info, peak_memory_mb, reset_peak_memory
from heft.tasks import EncodedExample, Example, Task, get_task
from heft.tasks.data import DataError, subsample

log = logging.getLogger("heft")

T = TypeVar("T")
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


# ------------------------------------------------------------------------------------------ data
def collate(examples: Sequence[EncodedExample], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch; mark prompt tokens (where ReFT may intervene) and target tokens (the loss)."""
    input_ids, attention_mask = pad_batch([e.input_ids for e in examples], pad_id, padding_side)
    width = input_ids.shape[1]
    lengths = torch.tensor([len(e.input_ids) for e in examples]).unsqueeze(1)
    prompt_lens = torch.tensor([e.prompt_len for e in examples]).unsqueeze(1)
    offset = width - lengths if padding_side == "left" else torch.zeros_like(lengths)
    rel = torch.arange(width).unsqueeze(0) - offset
    prompt_mask = (rel >= 0) & (rel < prompt_lens)
    labels = input_ids.masked_fill(~((rel >= prompt_lens) & (rel < lengths)), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask, "labels": labels}


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


# ------------------------------------------------------------------------------------------ loop
@dataclass
class Progress:
    """Budget counters of the whole run; stored in every checkpoint."""

    stage: int = 0
    epoch: int = 0
    """Completed epochs of `stage`."""
    optimizer_steps: int = 0
    train_tokens: int = 0
    """Tokens forwarded in training (prompt + target, padding excluded)."""
    eval_tokens: int = 0
    elapsed_s: float = 0.0


EpochCallback = Callable[[HeftModel, int, float, torch.optim.Optimizer], None]


def _optimizer(model: HeftModel, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only: not on biases, norms or the raw tensors behind
    LoReFT's orthogonal parametrization (decaying its Householder reflectors would pull R towards
    the first r coordinate axes)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "parametrizations" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "parametrizations" not in n)]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr)


def epoch_plan(num_batches: int, epochs: float) -> list[int]:
    """Micro-batches per epoch; a fractional last epoch runs part of the data."""
    total = math.ceil(round(num_batches * epochs, 6))  # 100 * 0.07 is 7.000000000000001: 7 batches, not 8
    return [min(num_batches, total - e * num_batches) for e in range(math.ceil(epochs))]


def train_stage(
    model: HeftModel,
    stage: StageConfig,
    data: Sequence[EncodedExample],
    cfg: RunConfig,
    accelerator: Accelerator,
    progress: Progress,
    on_epoch_end: EpochCallback,
    resume_from: Path | None = None,
    show_progress: bool = True,
) -> None:
    """Train the trainable parameters of `model` (the current stage) for `stage.epochs`."""
    lengths = [len(e.input_ids) for e in data]
    num_batches = math.ceil(len(data) / cfg.batch_size)
    plan = epoch_plan(num_batches, stage.epochs)
    total_steps = sum(math.ceil(n / cfg.grad_accum) for n in plan)
    optimizer = _optimizer(model, stage)
    scheduler = get_scheduler(
        SCHEDULES[stage.schedule],
        optimizer,
        num_warmup_steps=round(stage.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if resume_from is not None:
        load_optimizer(optimizer, resume_from)
        with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for _ in range(sum(math.ceil(n / cfg.grad_accum) for n in plan[: progress.epoch])):
                scheduler.step()
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    pad_id = model.tokenizer.pad_token_id
    for epoch in range(progress.epoch, len(plan)):
        epoch_seed = cfg.seed * 1_000_003 + progress.stage * 1_009 + epoch
        torch.manual_seed(epoch_seed)  # dropout masks: a resumed epoch equals an uninterrupted one
        batches = length_grouped_batches(lengths, cfg.batch_size, epoch_seed)[: plan[epoch]]
        loader = accelerator.prepare_data_loader(
            DataLoader(data, batch_sampler=batches, collate_fn=partial(collate, pad_id=pad_id, padding_side="right"))
        )
        wrapped.train()
        loss_sum, loss_count, tokens, start = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"stage {progress.stage} epoch {epoch + 1}/{len(plan)}", disable=not show_progress)
        # accelerate divides each micro-batch's loss by grad_accum; a group cut short by the epoch's end
        # has fewer micro-batches, so theirs are scaled back up to a mean over the group
        last_group = (len(loader) - 1) // cfg.grad_accum * cfg.grad_accum
        short_group_scale = cfg.grad_accum / (len(loader) - last_group)
        # bf16 copies of the frozen weights for the epoch, not cast again at every forward (identical
        # results); the float32 weights are back before on_epoch_end evaluates and saves.
        with model.frozen_weights_bf16(cfg.bf16), model.compiled_layers(cfg.compile):
            for i, batch in enumerate(bar):
                with accelerator.accumulate(wrapped):
                    with autocast(model, cfg.bf16):
                        loss = wrapped(**batch).loss
                    accelerator.backward(loss * short_group_scale if i >= last_group else loss)
                    if accelerator.sync_gradients:
                        if cfg.max_grad_norm is not None:
                            accelerator.clip_grad_norm_(model.trainable_parameters(), cfg.max_grad_norm)
                        progress.optimizer_steps += 1
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                tokens += int(batch["attention_mask"].sum())
                bar.set_postfix(
                    loss=f"{loss_sum / loss_count:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}"
                )
        bar.close()
        totals = accelerator.reduce(
            torch.tensor([tokens, loss_sum, loss_count], dtype=torch.float64, device=accelerator.device), "sum"
        )
        progress.train_tokens += int(totals[0])
        progress.epoch = epoch + 1
        on_epoch_end(
            model, epoch, float(totals[1] / max(totals[2], 1)), optimizer.optimizer
        )  # the torch optimizer inside accelerate's wrapper


# ---------------------------------------------------------------------------------------- recipe
def split_off(items: Sequence[T], n: int, seed: int) -> tuple[list[T], list[T]]:
    """A stratified sample of `n` items and the rest, both in their original order."""
    chosen = set(subsample(range(len(items)), n, seed, label=lambda i: items[i].label))
    return [x for i, x in enumerate(items) if i in chosen], [x for i, x in enumerate(items) if i not in chosen]


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


def load_data(task: Task, cfg: RunConfig, tokenizer) -> Splits:
    """Read and tokenise the splits (`read_splits`, then `encode_splits`)."""
    return encode_splits(task, cfg, read_splits(task, cfg), tokenizer)


def read_splits(task: Task, cfg: RunConfig) -> RowSplits:
    """Read, validate and subsample the splits; needs no tokenizer, so bad data fails fast.

    Held-out examples never reach training: the dev split (`data.dev_examples`), and the evaluation
    examples when they come from the training split, are carved out before `max_train_examples`.
    """
    data = cfg.data
    train_rows = task.load_split(data, data.train_split, None, cfg.seed)
    if data.eval_split == data.train_split:
        eval_rows, train_rows = split_off(train_rows, cfg.max_eval_examples, cfg.seed)
    else:
        eval_rows = task.load_split(data, data.eval_split, cfg.max_eval_examples, cfg.seed)
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
    return RowSplits(train_rows, eval_rows, dev_rows)


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
        "eval_split": data.eval_split + (" (held out of training)" if data.eval_split == data.train_split else ""),
        "dev_examples": len(dev),
        "train_truncated": train_truncated,
        "eval_truncated": eval_truncated,
    }
    log.info("data: %s", info)
    return Splits(train, evaluation, dev, info)


@torch.no_grad()
def mean_loss(model: HeftModel, batches: Sequence[dict[str, torch.Tensor]], bf16: bool) -> float | None:
    """Target-token-weighted mean loss over fixed batches, in eval mode (no dropout)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            with autocast(model, bf16):
                out = model(**{k: v.to(model.device) for k, v in batch.items()})
            total, count = total + float(out.loss) * out.target_tokens, count + out.target_tokens
    finally:
        model.train(was_training)
    return total / max(count, 1)


def run_training(cfg: RunConfig, run_dir: str | Path, show_progress: bool = True) -> dict:
    """Train every stage of `cfg` into `run_dir`, resuming from its last checkpoint if it has one.

    The folder is locked for the whole call: a second writer gets RunFolderBusy and writes nothing.
    Returns the content of `results.json`.
    """
    with run_folder_lock(run_dir):
        return _run_training(cfg, Path(run_dir), show_progress)


def _run_training(cfg: RunConfig, run_dir: Path, show_progress: bool) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    reset_peak_memory()
    # bf16 is applied by our own autocast (as in evaluation), not by Accelerator(mixed_precision=...):
    # accelerate's state is process-global, and runs with different settings share a process.
    # cpu=True on GPU-less hosts lets `torchrun --nproc_per_node N` run data-parallel on CPU (gloo).
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    show_progress = show_progress and is_main
    task = get_task(cfg.task)
    if (run_dir / "results.json").exists():
        raise FileExistsError(f"{run_dir} already holds a finished run; choose another output_dir")
    rows = read_splits(task, cfg)  # before the model: bad data must not wait for a model download
    trainer_state = read_trainer_state(run_dir) if (run_dir / "manifest.json").exists() else None
    if trainer_state is not None:
        progress = Progress(**trainer_state["progress"])
        model = load_run(run_dir)
        log.info("resuming %s at stage %d after epoch %d", run_dir, progress.stage, progress.epoch)
    else:
        progress = Progress()
        model = HeftModel.from_pretrained(cfg.model, cfg.dtype)
    try:  # the stages still to add, now, not hours later when a bad one starts (e.g. an arm branched off a prefix)
        model.check_stages(cfg.stages[len(model.stages) :], first_index=len(model.stages))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    model.to(accelerator.device)
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    splits = encode_splits(task, cfg, rows, model.tokenizer)
    train_data, eval_data = splits.train, splits.evaluation
    probe_data = train_data[: cfg.boundary_examples]
    probe = [
        collate(probe_data[i : i + cfg.batch_size], model.tokenizer.pad_token_id)
        for i in range(0, len(probe_data), cfg.batch_size)
    ]
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    if is_main and metrics_path.exists():  # lines from an attempt that reached no checkpoint, or past it
        if trainer_state is None:
            metrics_path.unlink()
        else:
            _drop_unsaved_metrics(metrics_path, progress)
    clock = time.perf_counter() - progress.elapsed_s
    history = read_metrics(metrics_path) if trainer_state is not None else []

    def dev_accuracy() -> float:
        """Accuracy on the dev split carved out of training (the stage gate's yardstick)."""
        return evaluate(model, task, splits.dev, batch_size=cfg.eval_batch_size, progress=False, bf16=cfg.bf16)[
            "accuracy"
        ]

    def record(
        stage_index: int,
        stage_name: str,
        epoch: int | None,
        train_loss: float | None,
        kind: str = "eval",
        evaluated: dict | None = None,
        measure: bool | None = None,
        **extra,
    ) -> dict:
        """Append a metrics line (`kind`: eval, stage_start or stage_end). It evaluates now when
        `measure` (default: for kind eval), or copies the evaluation in `evaluated`."""
        line = {
            "kind": kind,
            "stage": stage_name,
            "stage_index": stage_index,
            "epoch": epoch,
            "step": progress.optimizer_steps,
            "train_loss": train_loss,
            **extra,
        }
        if evaluated is not None:
            line.update({k: v for k, v in evaluated.items() if k.startswith("eval_")})
        elif kind == "eval" if measure is None else measure:
            result = evaluate(
                model, task, eval_data, batch_size=cfg.eval_batch_size, progress=show_progress, bf16=cfg.bf16
            )
            progress.eval_tokens += scored_tokens(eval_data)
            line.update(
                eval_accuracy=result["accuracy"],
                eval_majority_accuracy=result["majority_accuracy"],
                eval_per_class_accuracy=result["per_class_accuracy"],
                eval_mean_margin=result["mean_margin"],
                eval_correct=result["correct"],
                **{f"eval_{k}": result[k] for k in ("acc", "acc_norm") if k in result},
            )
            log.info("%s epoch %s: accuracy %.4f", stage_name, epoch, result["accuracy"])
        line.update(elapsed_s=round(time.perf_counter() - clock, 2), tokens_seen=progress.train_tokens)
        if is_main:
            append_jsonl(metrics_path, line)
        history.append(line)
        return line

    if trainer_state is None and cfg.eval_zero_shot:
        record(-1, "zero-shot", None, None)

    for index, stage_cfg in enumerate(cfg.stages):
        if index < progress.stage:
            continue
        resuming = trainer_state is not None and index == progress.stage and progress.epoch > 0
        gated = stage_cfg.keep == "if_better"
        # the gate's yardstick: the model the stage receives, before its (maybe random) init changes it
        received_dev_accuracy = dev_accuracy() if gated and not resuming else None
        stage = model.stages[index] if resuming else model.add_stage(stage_cfg, seed=cfg.seed + index)
        num_epochs = math.ceil(stage_cfg.epochs)
        if not resuming:
            record_stage_start(
                record, history, model, stage.name, index, cfg, probe, dev_accuracy=received_dev_accuracy
            )

        def on_epoch_end(m: HeftModel, epoch: int, train_loss: float, optimizer: torch.optim.Optimizer) -> None:
            last = epoch + 1 == num_epochs
            gate = {}
            if last and gated:  # judged before any merge, so that a rollback leaves the model untouched
                before = next(h["dev_accuracy"] for h in history if (h["stage_index"], h["epoch"]) == (index, 0))
                gate = gate_verdict(before, dev_accuracy())
                log.info(
                    "%s: dev accuracy %.4f -> %.4f: %s",
                    stage.name,
                    before,
                    gate["dev_accuracy"],
                    "rolled back" if gate["rolled_back"] else "kept",
                )
            if gate.get("rolled_back"):
                m.roll_back_stage()
            elif last:
                m.finish_stage()
            if evaluates_after(cfg.eval_every, epoch + 1, last):
                record(index, stage.name, epoch + 1, train_loss)
            if last:
                record(
                    index,
                    stage.name,
                    epoch + 1,
                    train_loss,
                    kind="stage_end",
                    boundary_loss=mean_loss(m, probe, cfg.bf16),
                    **gate,
                )
            progress.elapsed_s = time.perf_counter() - clock
            if is_main:
                checkpoint = Progress(**{**asdict(progress), **({"stage": index + 1, "epoch": 0} if last else {})})
                save_run(m, run_dir, cfg.seed, progress.optimizer_steps, optimizer, {"progress": asdict(checkpoint)})
            accelerator.wait_for_everyone()

        train_stage(
            model,
            stage_cfg,
            train_data,
            cfg,
            accelerator,
            progress,
            on_epoch_end,
            run_dir if resuming else None,
            show_progress,
        )
        progress.stage, progress.epoch = index + 1, 0

    if cfg.eval_every == "never":
        record(len(cfg.stages) - 1, "final", None, None)
    results = run_results(history, model, progress, splits.info, time.perf_counter() - clock, run_dir)
    results.update(run_provenance(rows.evaluation, run_dir))
    if is_main:  # the trainer state lets `heft reproduce` branch further stages off this run
        progress.elapsed_s = time.perf_counter() - clock
        save_run(model, run_dir, cfg.seed, progress.optimizer_steps, trainer_state={"progress": asdict(progress)})
        write_json(run_dir / "results.json", results)
    return results


def gate_verdict(before: float, after: float) -> dict:
    """The stage gate (`keep: if_better`): a stage that lowered dev accuracy is rolled back."""
    rolled_back = after < before
    return {
        "dev_accuracy_before": before,
        "dev_accuracy": after,
        "rolled_back": rolled_back,
        "rollback_reason": f"dev accuracy {after:.4f} < {before:.4f} when the stage started" if rolled_back else None,
    }


def run_results(
    history: Sequence[dict], model: HeftModel, progress: Progress, data_info: dict, wall_time_s: float, run_dir: Path
) -> dict:
    """results.json: the final evaluation, each stage's boundaries, the budget spent, the machine."""
    metrics = [m for m in history if m.get("kind", "eval") == "eval"]  # history: every line of metrics.jsonl
    final = metrics[-1]
    return {
        "final_accuracy": final["eval_accuracy"],
        "majority_accuracy": final["eval_majority_accuracy"],
        "zero_shot_accuracy": next((m["eval_accuracy"] for m in metrics if m["stage"] == "zero-shot"), None),
        "per_class_accuracy": final["eval_per_class_accuracy"],
        "mean_margin": final["eval_mean_margin"],
        "stages": [
            {
                "name": s.name,
                "method": s.config.method,
                "epochs": s.config.epochs,
                "trainable_params": s.trainable_params,
                **boundary_summary(history, s.index),
            }
            for s in model.stages
        ],
        "wall_time_s": round(wall_time_s, 2),
        "train_tokens": progress.train_tokens,
        "eval_tokens": progress.eval_tokens,
        "optimizer_steps": progress.optimizer_steps,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "device": device_info(),
        "data": data_info,
        "run_dir": str(run_dir),
    }


def evaluates_after(eval_every: str | int, epoch: int, last: bool) -> bool:
    """Whether `eval_every` asks for an evaluation after `epoch` (1-based within its stage)."""
    if eval_every == "never":
        return False
    return eval_every == "epoch" or last or (isinstance(eval_every, int) and epoch % eval_every == 0)


def record_stage_start(
    record: Callable[..., dict],
    history: list[dict],
    model: HeftModel,
    name: str,
    index: int,
    cfg: RunConfig,
    probe: Sequence[dict[str, torch.Tensor]],
    dev_accuracy: float | None,
) -> None:
    """Loss and evaluation of the model as a new stage receives it (its trainable part freshly
    initialised). When the stage starts as the identity, the previous evaluation is still valid.
    `dev_accuracy` (gated stages) was measured before the stage was added."""
    loss = mean_loss(model, probe, cfg.bf16)
    if cfg.eval_every == "never":
        record(index, name, 0, None, kind="stage_start", measure=False, boundary_loss=loss, dev_accuracy=dev_accuracy)
        return
    previous = next((m for m in reversed(history) if "eval_accuracy" in m), None)
    prev_epochs = math.ceil(cfg.stages[index - 1].epochs) if index else None
    received = previous is not None and (previous["stage_index"], previous["epoch"]) == (index - 1, prev_epochs)
    reuse = previous if received and cfg.stages[index].starts_as_identity else None
    record(
        index,
        name,
        0,
        None,
        kind="stage_start",
        evaluated=reuse,
        measure=reuse is None,
        boundary_loss=loss,
        eval_reused_from=f"{previous['stage']} epoch {previous['epoch']}" if reuse else None,
        dev_accuracy=dev_accuracy,
    )


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def boundary_summary(lines: Sequence[dict], index: int) -> dict:
    """Loss on the fixed probe batches and accuracy when stage `index` started and ended."""
    starts = [m for m in lines if m["stage_index"] == index and m["epoch"] == 0]
    ends = [m for m in lines if m["stage_index"] == index and m.get("kind") == "stage_end"]
    end = ends[-1] if ends else {}
    # the stage's last evaluation: after an epoch, or the run's final one (eval_every: never)
    evals = [m for m in lines if m["stage_index"] == index and m.get("kind", "eval") == "eval"]
    return {
        "loss_at_start": starts[-1].get("boundary_loss") if starts else None,
        "loss_at_end": end.get("boundary_loss"),
        "accuracy_at_start": starts[-1].get("eval_accuracy") if starts else None,
        "accuracy": evals[-1]["eval_accuracy"] if evals else None,  # at the end (results.json's key)
        "rolled_back": bool(end.get("rolled_back")),
        "rollback_reason": end.get("rollback_reason"),
    }


def _drop_unsaved_metrics(path: Path, progress: Progress) -> None:
    """Keep only the lines of epochs the checkpoint holds: a crash between an evaluation and its
    checkpoint must not leave a duplicate line once the epoch is trained again. A stage's start
    (epoch 0) belongs to it only once its first epoch is saved."""
    kept = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["stage"] == "final":  # the run's closing evaluation (eval_every: never) is made again
            continue
        index, epoch = entry["stage_index"], entry["epoch"] or 0
        done = progress.epoch if epoch else progress.epoch - 1
        if index < progress.stage or (index == progress.stage and epoch <= done):
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
