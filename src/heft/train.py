"""The training recipe: data → model → stages (train, evaluate, checkpoint) → results.

`run_training` runs a `TrainingRecipe`, whose state lives on `self` (torchtune's recipe shape):
`setup` reads the data and loads the model (or the checkpoint to resume), `run_stage` adds and trains
one stage, `on_epoch_end` judges, evaluates and checkpoints after each epoch, `finish` writes the
results. `train_stage` is the loop of one stage, also used by the Python API (`heft.api.fit`).

Each stage gets its own AdamW optimizer and schedule. Batches are length-grouped and padded
dynamically; the loss covers target tokens only. `accelerate` provides devices, DDP, gradient
accumulation and the experiment trackers (`report_to`), so `accelerate launch -m heft train ...`
scales out, with DDP or FSDP (`heft.sharding` says how heft shards). Every completed epoch is a checkpoint: an
interrupted run resumes from its last epoch.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from heft.config import ConfigError, RunConfig, StageConfig, save_config
from heft.data import collate, encode_splits, fixed_batches, length_grouped_batches, pad_multiple, read_splits
from heft.evaluate import autocast, evaluate, majority_correct, scored_tokens
from heft.files import write_json
from heft.io import load_optimizer, load_run, read_trainer_state, run_folder_lock, save_run
from heft.metrics import (
    FINAL,
    ZERO_SHOT,
    EvalFields,
    GateVerdict,
    MetricsLine,
    append_line,
    boundary_summary,
    copied_evaluation,
    drop_unsaved,
    evaluation_fields,
    paired_summary,
    read_metrics,
    results_summary,
)
from heft.models import decoder_layers
from heft.pipeline import HeftModel, Stage
from heft.provenance import run_provenance
from heft.sharding import average_gradients, check_launch, fsdp_hidden_from_accelerate, is_sharded, shard_base
from heft.sysinfo import device_info, peak_memory_mb, reset_peak_memory
from heft.tasks import EncodedExample, task_for
from heft.tracking import StepLog, accelerator_options, end_tracking, line_scalars, results_scalars, start_tracking

log = logging.getLogger("heft")

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


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
"""Called after each epoch with the model, the epoch (0-based), its mean loss and the torch optimizer."""


# ------------------------------------------------------------------------------------- the recipe
def run_training(cfg: RunConfig, run_dir: str | Path, show_progress: bool = True) -> dict:
    """Train every stage of `cfg` into `run_dir`, resuming from its last checkpoint if it has one.

    The folder is locked for the whole call: a second writer gets RunFolderBusy and writes nothing.
    Returns the content of `results.json`.
    """
    with run_folder_lock(run_dir):
        return TrainingRecipe(cfg, Path(run_dir), show_progress).run()


class TrainingRecipe:
    """One training run into a run folder: `setup`, then `run_stage` for each stage still to train
    (`on_epoch_end` after each of its epochs), then `finish`. Each writes what it learns to `self`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, show_progress: bool = True) -> None:
        self.cfg, self.run_dir, self.show_progress = cfg, run_dir, show_progress

    def run(self) -> dict:
        """The whole run; returns the content of `results.json`."""
        self.setup()
        try:
            if self.trainer_state is None and self.cfg.eval_zero_shot:
                self.record_evaluation(-1, ZERO_SHOT, None, None)
            for index in range(self.progress.stage, len(self.cfg.stages)):
                self.run_stage(index)
            return self.finish()
        finally:
            end_tracking(self.accelerator)

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Data, model and run folder, in the order that fails fastest: a finished folder and bad
        data are refused before the model loads, a bad stage before any training."""
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        reset_peak_memory()
        # bf16 is applied by our own autocast (as in evaluation), not by Accelerator(mixed_precision=...):
        # accelerate's state is process-global, and runs with different settings share a process.
        # cpu=True on GPU-less hosts lets `torchrun --nproc_per_node N` run data-parallel on CPU (gloo).
        # FSDP settings heft does not run are refused before anything loads
        self.sharded = check_launch(cfg.quantize is not None)
        with fsdp_hidden_from_accelerate():
            self.accelerator = Accelerator(
                gradient_accumulation_steps=cfg.grad_accum,
                cpu=not torch.cuda.is_available(),
                **accelerator_options(cfg, run_dir),
            )
        self.is_main = self.accelerator.is_main_process
        self.show_progress = self.show_progress and self.is_main
        self.task = task_for(cfg)
        if (run_dir / "results.json").exists():
            raise FileExistsError(f"{run_dir} already holds a finished run; choose another output_dir")
        self.rows = read_splits(self.task, cfg)  # before the model: bad data must not wait for a model download
        self._load_model()
        self.splits = encode_splits(self.task, cfg, self.rows, self.model.tokenizer)
        pad_id = self.model.tokenizer.pad_token_id
        self.probe = fixed_batches(self.splits.train[: cfg.boundary_examples], cfg.batch_size, pad_id)
        if self.is_main:
            save_config(cfg, run_dir / "config.yaml")
        self._open_metrics()
        start_tracking(self.accelerator, cfg, run_dir)

    def _load_model(self) -> None:
        """The checkpoint to resume, or the base model; then the stages still to add are checked now,
        not hours later when a bad one starts (e.g. an arm branched off a prefix)."""
        cfg, run_dir = self.cfg, self.run_dir
        self.trainer_state = read_trainer_state(run_dir) if (run_dir / "manifest.json").exists() else None
        if self.trainer_state is not None:
            self.progress = Progress(**self.trainer_state["progress"])
            self.model = load_run(run_dir)
            log.info("resuming %s at stage %d after epoch %d", run_dir, self.progress.stage, self.progress.epoch)
            if self.model.quantize != cfg.quantize:
                raise ConfigError(f"'quantize' is {cfg.quantize}, but {run_dir} was trained with {self.model.quantize}")
        else:
            self.progress = Progress()
            self.model = HeftModel.from_pretrained(cfg.model, cfg.dtype, cfg.quantize)
        try:
            self.model.check_stages(cfg.stages[len(self.model.stages) :], first_index=len(self.model.stages))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.model.to(self.accelerator.device)
        if self.sharded:
            shard_base(decoder_layers(self.model.model))
            log.info("FSDP: every decoder layer sharded over %d processes", self.accelerator.num_processes)
        if cfg.activation_checkpointing:
            self.model.enable_activation_checkpointing()

    def _open_metrics(self) -> None:
        """`metrics.jsonl` as the checkpoint left it: lines of an attempt that reached no checkpoint,
        or that were written after the last one, are dropped; the rest is the run's history."""
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main and self.metrics_path.exists():
            if self.trainer_state is None:
                self.metrics_path.unlink()
            else:
                drop_unsaved(self.metrics_path, self.progress.stage, self.progress.epoch)
        self.clock = time.perf_counter() - self.progress.elapsed_s
        self.history: list[MetricsLine] = read_metrics(self.metrics_path) if self.trainer_state is not None else []

    # ---------------------------------------------------------------------------------- stages
    def run_stage(self, index: int) -> None:
        """Add stage `index` (or take it up where the checkpoint left it) and train it."""
        stage_cfg = self.cfg.stages[index]
        resuming = self.trainer_state is not None and index == self.progress.stage and self.progress.epoch > 0
        # the gate's yardstick: the model the stage receives, before its (maybe random) init changes it
        received_dev_accuracy = self.dev_accuracy() if stage_cfg.keep == "if_better" and not resuming else None
        if resuming:
            self.stage = self.model.stages[index]
        else:
            self.stage = self.model.add_stage(stage_cfg, seed=self.cfg.seed + index)
            self.record_stage_start(received_dev_accuracy)
        resume_from = self.run_dir if resuming else None
        train_stage(
            self.model,
            stage_cfg,
            self.splits.train,
            self.cfg,
            self.accelerator,
            self.progress,
            self.on_epoch_end,
            resume_from,
            self.show_progress,
        )
        self.progress.stage, self.progress.epoch = index + 1, 0

    def on_epoch_end(self, model: HeftModel, epoch: int, train_loss: float, optimizer: torch.optim.Optimizer) -> None:
        """After each epoch: at the stage's last, judge it (gate) and merge or roll it back; evaluate
        as `eval_every` asks; record the stage's end; save the checkpoint."""
        stage, index = self.stage, self.stage.index
        last = epoch + 1 == math.ceil(self.cfg.stages[index].epochs)
        gate = self._judge(stage) if last and self.cfg.stages[index].keep == "if_better" else {}
        loss_before_merge = None
        if gate.get("rolled_back"):
            model.roll_back_stage()
        elif last:
            if stage.merges:  # a merge into a quantized base rounds: by how much
                loss_before_merge = mean_loss(model, self.probe, self.cfg.bf16)
            model.finish_stage()
        if evaluates_after(self.cfg.eval_every, epoch + 1, last):
            self.record_evaluation(index, stage.name, epoch + 1, train_loss)
        if last:
            after = mean_loss(model, self.probe, self.cfg.bf16)
            merge = {}
            if stage.config.uses_lora and not gate.get("rolled_back"):  # unmerged, finishing changes nothing
                merge["loss_before_merge"] = after if loss_before_merge is None else loss_before_merge
            self._record("stage_end", index, stage.name, epoch + 1, train_loss, boundary_loss=after, **gate, **merge)
        self._save_checkpoint(optimizer, last)

    def _judge(self, stage: Stage) -> GateVerdict:
        """The stage gate, judged before any merge, so that a rollback leaves the model untouched."""
        start = next(h for h in self.history if (h["stage_index"], h["epoch"]) == (stage.index, 0))
        gate = gate_verdict(start["dev_accuracy"], self.dev_accuracy())
        verdict = "rolled back" if gate["rolled_back"] else "kept"
        log.info("%s: dev accuracy %.4f -> %.4f: %s", stage.name, start["dev_accuracy"], gate["dev_accuracy"], verdict)
        return gate

    def _save_checkpoint(self, optimizer: torch.optim.Optimizer, stage_done: bool) -> None:
        """Every epoch is a checkpoint; after a stage's last, it resumes at the next stage."""
        progress = self.progress
        progress.elapsed_s = time.perf_counter() - self.clock
        if self.is_main:
            after = {"stage": self.stage.index + 1, "epoch": 0} if stage_done else {}
            state = {"progress": asdict(Progress(**{**asdict(progress), **after}))}
            save_run(self.model, self.run_dir, self.cfg.seed, progress.optimizer_steps, optimizer, state)
        self.accelerator.wait_for_everyone()

    # ----------------------------------------------------------------------- evaluations, lines
    def dev_accuracy(self) -> float:
        """Accuracy on the dev split carved out of training (the stage gate's yardstick)."""
        cfg = self.cfg
        return evaluate(
            self.model, self.task, self.splits.dev, batch_size=cfg.eval_batch_size, progress=False, bf16=cfg.bf16
        )["accuracy"]

    def _evaluation(self, stage_name: str, epoch: int | None) -> EvalFields:
        """Evaluate the model now, on the evaluation split."""
        cfg, examples = self.cfg, self.splits.evaluation
        result = evaluate(
            self.model, self.task, examples, batch_size=cfg.eval_batch_size, progress=self.show_progress, bf16=cfg.bf16
        )
        self.progress.eval_tokens += scored_tokens(examples)
        log.info("%s epoch %s: accuracy %.4f", stage_name, epoch, result["accuracy"])
        return evaluation_fields(result)

    def record_evaluation(self, index: int, stage_name: str, epoch: int | None, train_loss: float | None) -> None:
        """Evaluate and write an `eval` line."""
        self._record("eval", index, stage_name, epoch, train_loss, **self._evaluation(stage_name, epoch))

    def record_stage_start(self, dev_accuracy: float | None) -> None:
        """Loss and evaluation of the model as the new stage receives it (its trainable part freshly
        initialised). When the stage starts as the identity, the previous evaluation is still valid.
        `dev_accuracy` (gated stages) was measured before the stage was added."""
        index, name = self.stage.index, self.stage.name
        loss = mean_loss(self.model, self.probe, self.cfg.bf16)
        if self.cfg.eval_every == "never":
            self._record("stage_start", index, name, 0, None, boundary_loss=loss, dev_accuracy=dev_accuracy)
            return
        reuse = self._received_evaluation(index)
        evaluation = copied_evaluation(reuse) if reuse else self._evaluation(name, 0)
        reused_from = f"{reuse['stage']} epoch {reuse['epoch']}" if reuse else None
        self._record(
            "stage_start",
            index,
            name,
            0,
            None,
            boundary_loss=loss,
            eval_reused_from=reused_from,
            dev_accuracy=dev_accuracy,
            **evaluation,
        )

    def _received_evaluation(self, index: int) -> MetricsLine | None:
        """The last evaluation, when it is of the model stage `index` receives and that stage starts
        as the identity (so the evaluation still holds); else None."""
        previous = next((m for m in reversed(self.history) if "eval_accuracy" in m), None)
        prev_epochs = math.ceil(self.cfg.stages[index - 1].epochs) if index else None
        received = previous is not None and (previous["stage_index"], previous["epoch"]) == (index - 1, prev_epochs)
        return previous if received and self.cfg.stages[index].starts_as_identity else None

    def _record(
        self, kind: str, index: int, stage_name: str, epoch: int | None, train_loss: float | None, **fields
    ) -> None:
        """Append a metrics line (on the main process), keep it in the history, send it to the trackers."""
        line = {
            "kind": kind,
            "stage": stage_name,
            "stage_index": index,
            "epoch": epoch,
            "step": self.progress.optimizer_steps,
            "train_loss": train_loss,
            **fields,
            "elapsed_s": round(time.perf_counter() - self.clock, 2),
            "tokens_seen": self.progress.train_tokens,
        }
        if self.is_main:
            append_line(self.metrics_path, line)
        self.history.append(line)
        self.accelerator.log(line_scalars(line), step=line["step"])

    # ---------------------------------------------------------------------------------- finish
    def finish(self) -> dict:
        """The closing evaluation (`eval_every: never`), the final save and `results.json`."""
        cfg, progress = self.cfg, self.progress
        if cfg.eval_every == "never":
            self.record_evaluation(len(cfg.stages) - 1, FINAL, None, None)
        wall_time = time.perf_counter() - self.clock
        majority = majority_correct(self.task, self.splits.evaluation)
        results = run_results(self.history, majority, self.model, progress, self.splits.info, wall_time, self.run_dir)
        results.update(run_provenance(self.rows.evaluation, self.run_dir))
        if self.is_main:  # the trainer state lets `heft reproduce` branch further stages off this run
            progress.elapsed_s = time.perf_counter() - self.clock
            save_run(
                self.model,
                self.run_dir,
                cfg.seed,
                progress.optimizer_steps,
                trainer_state={"progress": asdict(progress)},
            )
            write_json(self.run_dir / "results.json", results)
        self.accelerator.log(results_scalars(results), step=progress.optimizer_steps)
        return results


# ----------------------------------------------------------------------------- one stage's loop
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
    plan = epoch_plan(math.ceil(len(data) / cfg.batch_size), stage.epochs)
    optimizer = _optimizer(model, stage)
    if resume_from is not None:
        load_optimizer(optimizer, resume_from)
    scheduler = _schedule(optimizer, stage, plan, cfg.grad_accum, progress.epoch if resume_from else 0)
    wrapped, optimizer, scheduler = _prepare(accelerator, model, optimizer, scheduler)
    loop = _EpochLoop(model, wrapped, optimizer, scheduler, cfg, accelerator, progress, show_progress)
    # bucketed widths: the compiled layers (CUDA graphs: one per shape) see at most max_length / multiple shapes
    multiple = pad_multiple(cfg.pad_to_multiple_of, accelerator.device)
    collate_fn = partial(collate, pad_id=model.tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    for epoch in range(progress.epoch, len(plan)):
        epoch_seed = cfg.seed * 1_000_003 + progress.stage * 1_009 + epoch
        torch.manual_seed(epoch_seed)  # dropout masks: a resumed epoch equals an uninterrupted one
        batches = length_grouped_batches(lengths, cfg.batch_size, epoch_seed)[: plan[epoch]]
        loader = accelerator.prepare_data_loader(DataLoader(data, batch_sampler=batches, collate_fn=collate_fn))
        tokens, loss_sum, loss_count = loop.run(loader, f"stage {progress.stage} epoch {epoch + 1}/{len(plan)}")
        progress.train_tokens += int(tokens)
        progress.epoch = epoch + 1
        # the torch optimizer inside accelerate's wrapper
        on_epoch_end(model, epoch, float(loss_sum / max(loss_count, 1)), optimizer.optimizer)


def _prepare(
    accelerator: Accelerator,
    model: HeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple:
    """accelerate's wrappers (DDP's, accumulation's); under FSDP the model stays as sharded by
    `heft.sharding.shard_base`, and the optimizer and schedule get the wrappers `prepare` would give."""
    if not is_sharded(model):
        return accelerator.prepare(model, optimizer, scheduler)
    optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
    scheduler = AcceleratedScheduler(
        scheduler,
        optimizer,
        step_with_optimizer=accelerator.step_scheduler_with_optimizer,
        split_batches=accelerator.split_batches,
    )
    return model, optimizer, scheduler


@dataclass
class _EpochLoop:
    """The optimizer steps of one epoch, with what every epoch of a stage shares."""

    model: HeftModel
    wrapped: torch.nn.Module
    """`model` as `accelerator.prepare` returned it (DDP, FSDP or itself)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cfg: RunConfig
    accelerator: Accelerator
    progress: Progress
    show_progress: bool

    def run(self, loader: DataLoader, desc: str) -> torch.Tensor:
        """Train on every batch of `loader`; returns (tokens, loss sum, micro-batches) summed over processes."""
        cfg, accelerator = self.cfg, self.accelerator
        self.wrapped.train()
        loss_sum, loss_count, tokens, start = 0.0, 0, 0, time.perf_counter()
        step_log = StepLog(accelerator, cfg.log_every)
        # accelerate divides each micro-batch's loss by grad_accum; a group cut short by the epoch's end
        # has fewer micro-batches, so theirs are scaled back up to a mean over the group
        last_group = (len(loader) - 1) // cfg.grad_accum * cfg.grad_accum
        short_group_scale = cfg.grad_accum / (len(loader) - last_group)
        bar = tqdm(loader, desc=desc, disable=not self.show_progress)
        # bf16 copies of the frozen weights for the epoch, not cast again at every forward (identical
        # results); the float32 weights are back before on_epoch_end evaluates and saves.
        with self.model.frozen_weights_bf16(cfg.bf16), self.model.compiled_layers(cfg.compile):
            for i, batch in enumerate(bar):
                batch_tokens = int(batch["attention_mask"].sum())
                loss = self._step(batch, batch_tokens, short_group_scale if i >= last_group else 1.0, step_log)
                loss_sum, loss_count, tokens = loss_sum + loss, loss_count + 1, tokens + batch_tokens
                bar.set_postfix(
                    loss=f"{loss_sum / loss_count:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}"
                )
        bar.close()
        local = torch.tensor([tokens, loss_sum, loss_count], dtype=torch.float64, device=accelerator.device)
        return accelerator.reduce(local, "sum")

    def _step(self, batch: dict[str, torch.Tensor], tokens: int, scale: float, step_log: StepLog) -> float:
        """Forward and backward one micro-batch; step the optimizer where its accumulation group ends."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.wrapped):
            with autocast(self.model, self.cfg.bf16):
                loss = self.wrapped(**batch).loss
            accelerator.backward(loss * scale)
            step_log.add(loss.item(), tokens)
            if accelerator.sync_gradients:
                self._sync_and_clip()
                self.progress.optimizer_steps += 1
                step_log.step(self.progress.optimizer_steps, self.scheduler.get_last_lr()[0])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _sync_and_clip(self) -> None:
        """Gradients of a whole accumulation group: under FSDP the trainable parameters, which it does not
        manage, are averaged here (DDP does it in the backward); then clipped to `max_grad_norm`."""
        params = self.model.trainable_parameters()
        if self.wrapped is self.model and is_sharded(self.model):
            average_gradients(params)
            if self.cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        elif self.cfg.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)


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


def _schedule(
    optimizer: torch.optim.Optimizer, stage: StageConfig, plan: list[int], grad_accum: int, resume_at_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The stage's learning-rate schedule over all its optimizer steps, fast-forwarded past the
    epochs a resumed stage already trained."""
    total_steps = sum(math.ceil(n / grad_accum) for n in plan)
    scheduler = get_scheduler(
        SCHEDULES[stage.schedule],
        optimizer,
        num_warmup_steps=round(stage.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is intended
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for _ in range(sum(math.ceil(n / grad_accum) for n in plan[:resume_at_epoch])):
            scheduler.step()
    return scheduler


# --------------------------------------------------------------------------- measures and rules
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


def gate_verdict(before: float, after: float) -> GateVerdict:
    """The stage gate (`keep: if_better`): a stage that lowered dev accuracy is rolled back."""
    rolled_back = after < before
    return {
        "dev_accuracy_before": before,
        "dev_accuracy": after,
        "rolled_back": rolled_back,
        "rollback_reason": f"dev accuracy {after:.4f} < {before:.4f} when the stage started" if rolled_back else None,
    }


def evaluates_after(eval_every: str | int, epoch: int, last: bool) -> bool:
    """Whether `eval_every` asks for an evaluation after `epoch` (1-based within its stage)."""
    if eval_every == "never":
        return False
    return eval_every == "epoch" or last or (isinstance(eval_every, int) and epoch % eval_every == 0)


def run_results(
    history: Sequence[MetricsLine],
    majority_correct: str,
    model: HeftModel,
    progress: Progress,
    data_info: dict,
    wall_time_s: float,
    run_dir: Path,
) -> dict:
    """results.json: the final evaluation, its paired comparisons with zero-shot and the majority class
    (`majority_correct`: that baseline's right answers), each stage's boundaries, the budget spent, the machine."""
    return {
        **results_summary(history),
        "paired": paired_summary(history, majority_correct),
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
