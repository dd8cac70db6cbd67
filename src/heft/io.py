"""Run folders: the manifest, saving and loading staged models, optimizer state.

Layout of a run folder::

    manifest.json                  versions, base model id + sha256, stages, seed, file hashes
    weights/step-000120/           the stages' weights (a new folder per save)
        0-lora/adapter_config.json, adapter_model.safetensors   (peft's own format)
        1-loreft/interventions.safetensors, intervention_config.json
    config.yaml, metrics.jsonl, results.json   (written by the training recipe)
    .heft.lock, .heft.lock.pid     one writer at a time (`run_folder_lock`)

A save writes a fresh `weights/step-*` folder, then atomically replaces `manifest.json` to point
at it, then deletes older weight folders: a killed process, or a failed write, leaves the previous
save loadable.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock
import safetensors.torch
import torch

from heft.config import StageConfig
from heft.files import sha256_file, versions, write_file, write_json
from heft.methods.lora import LoraConfig
from heft.methods.reft import ReftConfig
from heft.models import load_model
from heft.pipeline import HeftModel
from heft.quantize import QuantizeConfig, as_record, check_runnable, from_record

MANIFEST = "manifest.json"
FORMAT = "heft-run/1"
EXPORTED_BASE = "."
"""Base-model id of an exported folder: the folder itself holds the (merged) base model."""


TRAINER_STATE = "trainer_state.json"
"""Progress of a resumable save (every epoch, and the end of a run so that arms can branch from it)."""


LOCK = ".heft.lock"
"""Lock file of a run folder (flock: the kernel frees it when its holder exits, even by kill -9)."""
LOCK_PID = ".heft.lock.pid"
"""Pid of the process holding the lock, for the message a second writer gets."""


class RunFolderError(ValueError):
    """A run folder that cannot be loaded as asked (missing, incomplete, or for another base model)."""


class RunFolderBusy(RunFolderError):
    """Another process is writing into the run folder."""


class SaveError(OSError):
    """A save that could not be written (no space, no permission, read-only folder); its partial
    files are gone and the manifest still points at the previous save."""


@contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the lock of `run_dir` (created if missing) for a whole run: two writers in one folder
    would interleave metrics and checkpoints. Under torchrun or `accelerate launch` only the main
    process (RANK 0) writes the folder, so only it locks."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(run_dir / LOCK)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        holder = run_dir / LOCK_PID
        pid = holder.read_text().strip() if holder.is_file() else "unknown"
        raise RunFolderBusy(
            f"{run_dir} is being written by another heft process (pid {pid}); refusing to write into it too"
        ) from None
    try:
        (run_dir / LOCK_PID).write_text(f"{os.getpid()}\n")
        yield
    finally:
        (run_dir / LOCK_PID).unlink(missing_ok=True)
        lock.release()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, written by Python: a full disk then raises OSError with its errno
    (safetensors' own writer raises a SafetensorError carrying only text)."""
    write_file(path, safetensors.torch.save(tensors))


def _stage_entry(stage) -> dict:
    return {
        "index": stage.index,
        "name": stage.name,
        "method": stage.config.method,
        "config": dataclasses.asdict(stage.config),
        "trainable_params": stage.trainable_params,
        "finished": stage.finished,
        "merged": stage.merged,
        "rolled_back": stage.rolled_back,
    }


def save_run(
    model: HeftModel,
    run_dir: str | Path,
    seed: int | None = None,
    step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict | None = None,
) -> Path:
    """Save every stage of `model` into `run_dir` (atomically, see module docstring).

    With `optimizer` and `trainer_state` the save is also a resumable checkpoint: both go into
    the same weights folder, so weights and optimizer state are always of the same step.
    A save that fails (full disk, no permission) removes what it wrote at once and raises
    SaveError; the folder keeps its previous save, so a rerun resumes from it.
    """
    run_dir = Path(run_dir)
    weights_root = run_dir / "weights"
    tmp = published = None
    try:
        weights_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=weights_root, prefix=".tmp-"))
        stages = _write_weights(model, tmp, optimizer, trainer_state)
        final = weights_root / (f"step-{step:08d}" if optimizer is not None else "final")
        while final.exists():  # never overwrite the folder the current manifest may point at
            final = final.with_name(final.name + "+")
        files = {
            str(final.relative_to(run_dir) / path.relative_to(tmp)): sha256_file(path)
            for path in sorted(tmp.rglob("*"))
            if path.is_file()
        }
        os.replace(tmp, final)
        published = final
        manifest = {
            "format": FORMAT,
            "versions": versions(),
            "base_model": {
                "id": model.model_id,
                "sha256": model.weights_sha256,
                "dtype": str(model.model.dtype).removeprefix("torch."),
                "quantize": as_record(model.quantize),
            },
            "seed": seed,
            "stages": stages,
            "weights": str(final.relative_to(run_dir)),
            "files": files,
            "checkpoint": optimizer is not None,
        }
        write_json(run_dir / MANIFEST, manifest)
    except BaseException as err:
        if published is not None and _manifest_weights(run_dir) == str(published.relative_to(run_dir)):
            published = None  # interrupted just after the manifest's rename: the new save stands
        for partial in (tmp, published):  # the manifest still points at the previous save
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError):
            raise SaveError(_save_failure(err, run_dir, model, optimizer)) from err
        raise
    for old in weights_root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return run_dir


def _manifest_weights(run_dir: Path) -> str | None:
    """The weights folder the run's manifest points at, or None where there is no readable manifest."""
    try:
        return json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_weights(
    model: HeftModel, tmp: Path, optimizer: torch.optim.Optimizer | None, trainer_state: dict | None
) -> list[dict]:
    """Write the stages' files (and the optimizer state) into `tmp`; returns the manifest's stage entries."""
    stages = []
    for stage in model.stages:
        folder = tmp / stage.name
        folder.mkdir()
        if stage.rolled_back:  # nothing of it is left in the model
            stages.append(_stage_entry(stage))
            continue
        if stage.config.uses_lora:
            dataclasses.replace(stage.peft_config, base_model_name_or_path=model.model_id).save_pretrained(folder)
            save_tensors(model.lora_state_dict(stage), folder / "adapter_model.safetensors")
        if stage.reft is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in stage.reft.state_dict().items()}
            save_tensors(state, folder / "interventions.safetensors")
            reft_meta = {
                "config": dataclasses.asdict(stage.config.reft),
                "layers": stage.reft.layers,
                "hidden_size": model.hidden_size,
            }
            write_json(folder / "intervention_config.json", reft_meta)
        stages.append(_stage_entry(stage))
    if optimizer is not None:
        save_optimizer(optimizer, tmp, trainer_state or {})
    elif trainer_state is not None:  # a stage boundary: the next stage starts a new optimizer
        write_json(tmp / TRAINER_STATE, trainer_state)
    return stages


def _save_failure(err: OSError, run_dir: Path, model: HeftModel, optimizer: torch.optim.Optimizer | None) -> str:
    """One line: where and why a save failed, and for a full disk how much space it needs."""
    message = f"could not save {run_dir}: {err.strerror or err} ({err.filename or run_dir})"
    if err.errno == errno.ENOSPC:
        tensors = [
            t
            for s in model.stages
            if s.config.uses_lora and not s.rolled_back
            for t in model.lora_state_dict(s).values()
        ]
        tensors += [t for s in model.stages if s.reft is not None for t in s.reft.state_dict().values()]
        if optimizer is not None:
            tensors += [v for slots in optimizer.state.values() for v in slots.values() if torch.is_tensor(v)]
        size = sum(t.nbytes for t in tensors)
        message += f"; the save needs about {f'{size / 1e6:,.1f} MB' if size >= 1e5 else f'{size:,} bytes'} free"
    return message + "; the previous save is kept"


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a heft run folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunFolderError(
            f"{path} is not valid JSON ({err.msg}, line {err.lineno}); the folder cannot be loaded"
        ) from None
    if manifest.get("format") != FORMAT:
        raise RunFolderError(f"{path}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    _inside(run_dir, manifest["weights"], path, "weights")
    for rel in manifest["files"]:
        _inside(run_dir, rel, path, "files")
    for rel, digest in manifest["files"].items():
        file = Path(run_dir) / rel
        if not file.is_file() or sha256_file(file) != digest:
            raise RunFolderError(f"{run_dir} is incomplete or modified: {rel} does not match the manifest")
    return manifest


def _inside(run_dir: str | Path, rel: str, manifest: Path, field: str) -> None:
    """A loader reads only inside its run folder: refuse a manifest path that is absolute, climbs out
    with `..`, or leads out through a symlink."""
    root = Path(run_dir).resolve()
    if Path(rel).is_absolute() or not (root / rel).resolve().is_relative_to(root):
        raise RunFolderError(
            f"{manifest}: field '{field}' points outside the run folder ({rel!r}); refusing to read it"
        )


def stage_config_from_dict(data: dict) -> StageConfig:
    """Rebuild a StageConfig from the manifest's own serialisation."""
    # Folders written before `reft.init` existed were trained with pyreft's random initialisation.
    reft = ReftConfig(**{"init": "random", **data["reft"]})
    return StageConfig(**{**data, "lora": LoraConfig(**data["lora"]), "reft": reft})


def load_run(
    run_dir: str | Path, model: HeftModel | None = None, base_model: str | None = None, zero_shot: bool = False
) -> HeftModel:
    """Rebuild the staged model saved in `run_dir`.

    The base model is loaded from the manifest's id (or `base_model`, e.g. a local copy) and must
    have the recorded sha256. Finished LoRA stages are re-merged exactly as in training; an
    unfinished last stage is left trainable, so training can resume. `zero_shot`: the base model
    alone, the model the run started from (of an exported folder: its base, with the LoRA merged).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    base = manifest["base_model"]
    quantize = from_record(base.get("quantize"))  # folders written before quantization have no key
    if model is None:
        base_id = str(run_dir) if base["id"] == EXPORTED_BASE else base["id"]
        if quantize is not None:  # before the weights load: a missing backend is a one-line error
            check_runnable(quantize, f"{run_dir / MANIFEST} (base_model)")
        model = HeftModel.from_pretrained(base_model or base_id, base["dtype"], quantize)
    if model.quantize != quantize:
        raise RunFolderError(
            f"{run_dir} was trained on a base quantized as {as_record(quantize)}, but the given model is "
            f"quantized as {as_record(model.quantize)}; refusing to combine them"
        )
    if model.weights_sha256 != base["sha256"]:
        raise RunFolderError(
            f"{run_dir} was trained on base model {base['id']} with weights sha256 {base['sha256'][:12]}…, "
            f"but the loaded base model has {model.weights_sha256[:12]}…; refusing to combine them"
        )
    weights = run_dir / manifest["weights"]
    for entry in [] if zero_shot else manifest["stages"]:
        stage = model.add_stage(stage_config_from_dict(entry["config"]))
        if entry.get("rolled_back"):
            model.roll_back_stage()
            continue
        folder = weights / entry["name"]
        if stage.config.uses_lora:
            model.load_lora_state_dict(stage, safetensors.torch.load_file(folder / "adapter_model.safetensors"))
        if stage.reft is not None:
            if entry["finished"]:  # R loads as the plain tensor it was saved from, bit for bit
                stage.reft.freeze_()
            stage.reft.load_state_dict(
                safetensors.torch.load_file(folder / "interventions.safetensors", device=str(model.device))
            )
        if entry["finished"]:
            model.finish_stage()
    model.eval()
    return model


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path, trainer_state: dict) -> None:
    """Optimizer state as safetensors (tensors) + JSON (hyperparameters, scheduler, progress)."""
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{key}": value.contiguous() for idx, slots in state["state"].items() for key, value in slots.items()
    }
    save_tensors(tensors, folder / "optimizer.safetensors")
    write_json(folder / TRAINER_STATE, {"param_groups": state["param_groups"], **trainer_state})


def read_trainer_state(run_dir: str | Path) -> dict | None:
    """Progress of the last checkpoint in `run_dir`, or None when the run holds no checkpoint."""
    manifest = read_manifest(run_dir)
    relative = str(Path(manifest["weights"]) / TRAINER_STATE)
    if relative not in manifest["files"]:
        return None
    return json.loads((Path(run_dir) / relative).read_text())


def load_optimizer(optimizer: torch.optim.Optimizer, run_dir: str | Path) -> dict:
    """Restore the optimizer state of the checkpoint in `run_dir`; returns its trainer state."""
    path = Path(run_dir) / read_manifest(run_dir)["weights"]
    meta = json.loads((path / TRAINER_STATE).read_text())
    tensors = safetensors.torch.load_file(path / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, slot = key.split(".", 1)
        state.setdefault(int(idx), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


def export_run(run_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write a self-contained folder: the base model with every LoRA stage merged (a normal HF
    model folder, loadable by plain transformers) plus the ReFT stages as a heft run on top of it.

    `heft.load_run(out_dir)` rebuilds the full hierarchy from it; its logits equal the run's. A run
    on a quantized base exports its dequantized weights with the unmerged LoRA updates added in
    float (never requantized); HEFT_EXPORT.md states how far its logits are from the quantized run's.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    model = load_run(run_dir, base_model=base_model)
    manifest = read_manifest(run_dir)
    quantized = model.quantize
    run_logits = probe_logits(model) if quantized is not None else None
    if quantized is not None:
        model.dequantize()
    else:
        model.merge_adapters()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))  # same filesystem: os.replace works
    try:
        model.model.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        base = HeftModel(load_model(str(tmp), manifest["base_model"]["dtype"]))
        base.model_id = EXPORTED_BASE
        for stage in model.stages:
            if stage.reft is not None:
                reft_only = dataclasses.replace(stage.config, method=stage.config.reft.kind, name=stage.name)
                base.add_stage(reft_only).trainable_params = stage.trainable_params
                base.finish_stage()  # first, so that R is copied as a plain tensor, bit for bit
                base.stages[-1].reft.load_state_dict(stage.reft.state_dict())
        save_run(base, tmp, manifest.get("seed"))
        for name in ("config.yaml", "results.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        note = _export_note(run_dir, out_dir, manifest, model)
        if quantized is not None:
            note += _dequantized_note(quantized, (probe_logits(base) - run_logits).abs().max().item())
        (tmp / "HEFT_EXPORT.md").write_text(note)
        (tmp / "README.md").write_text(model_card(model, manifest, _read_results(run_dir), out_dir))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:  # no half-written copy of the model left beside out_dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


PROBE_TEXT = "The quick brown fox jumps over the lazy dog.\nQuestion: is the fox quick?\nAnswer:"
"""A fixed text whose logits compare an export with the run it came from."""


@torch.no_grad()
def probe_logits(model: HeftModel) -> torch.Tensor:
    """Logits (float32, every position) of the whole hierarchy on `PROBE_TEXT`."""
    ids = torch.tensor([model.tokenizer(PROBE_TEXT)["input_ids"]], device=model.device)
    return model.lm_head(model(ids).hidden_states).float().cpu()


def _export_note(run_dir: Path, out_dir: Path, manifest: dict, model: HeftModel) -> str:
    lora_names = [s.name for s in model.stages if s.config.uses_lora and not s.rolled_back]
    reft_names = [s.name for s in model.stages if s.reft is not None]
    return (
        f"# Exported from {run_dir}\n\n"
        f"Base model `{manifest['base_model']['id']}` with LoRA stages {lora_names or 'none'} "
        "merged into the weights.\n"
        f"ReFT stages {reft_names or 'none'} are stored under `weights/` and are applied by heft:\n\n"
        '```python\nimport heft\nmodel = heft.load_run("' + str(out_dir) + '")  # full hierarchy\n```\n\n'
        "Plain `transformers.AutoModelForCausalLM.from_pretrained(...)` on this folder gives the merged model "
        "without the ReFT interventions.\n"
    )


def _read_results(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _stage_row(stage, results: dict | None) -> str:
    """One line of the card's stage table: method, the hyperparameters that define it, its size and score."""
    cfg = stage.config
    settings = [f"{cfg.epochs:g} epochs", f"lr {cfg.lr:g}"]
    if cfg.uses_lora:
        settings.append(f"LoRA r {cfg.lora.r}, alpha {cfg.lora.alpha}, merged: {bool(cfg.lora.merge)}")
    if cfg.uses_reft:
        settings.append(f"ReFT rank {cfg.reft.rank}, layers {cfg.reft.layers}, positions {cfg.reft.positions}")
    per_stage = {s.get("name"): s for s in (results or {}).get("stages", [])}
    accuracy = per_stage.get(stage.name, {}).get("accuracy")
    score = "—" if accuracy is None else f"{100 * accuracy:.2f} %"
    state = " (rolled back)" if stage.rolled_back else ""
    return f"| {stage.name}{state} | {cfg.method} | {'; '.join(settings)} | {stage.trainable_params:,} | {score} |"


def model_card(model: HeftModel, manifest: dict, results: dict | None, out_dir: Path) -> str:
    """The exported folder's README.md: what the Hub shows (its YAML header) and what a reader needs
    to trust and reload the model: base and hash, stages, data, accuracy, how to load it."""
    base = manifest["base_model"]
    data = (results or {}).get("data", {})
    final = (results or {}).get("final_accuracy")
    lines = [
        "---",
        f"base_model: {base['id']}",
        "library_name: heft",
        "tags: [peft, lora, reft]",
        "---",
        "",
        f"# {out_dir.name}",
        "",
        f"A hierarchical PEFT model trained with heft {manifest['versions'].get('heft', '')}: "
        "LoRA stages merged into the weights, then ReFT interventions on hidden representations.",
        "",
        f"- Base model: `{base['id']}` (weights sha256 `{base['sha256']}`, dtype {base['dtype']})",
        f"- Data: {data.get('source', 'not recorded')}; {data.get('train_examples', '?')} training and "
        f"{data.get('eval_examples', '?')} evaluation examples (split {data.get('eval_split', '?')})",
        f"- Final accuracy: {'not recorded' if final is None else f'{100 * final:.2f} %'}"
        + (f" (majority class {100 * results['majority_accuracy']:.2f} %)" if results else ""),
        f"- Seed: {manifest.get('seed')}",
        "",
        "| stage | method | hyperparameters | trainable parameters | accuracy at its end |",
        "|---|---|---|---|---|",
        *(_stage_row(stage, results) for stage in model.stages),
        "",
        "## Load it",
        "",
        '```python\nimport heft\nmodel = heft.load_run("' + str(out_dir) + '")  # the full hierarchy\n```',
        "",
        "or from the command line: `heft eval " + str(out_dir) + "`, `heft predict " + str(out_dir) + " ...`. "
        "`transformers.AutoModelForCausalLM.from_pretrained` on this folder gives the merged model without the "
        "ReFT interventions.",
        "",
    ]
    return "\n".join(lines)


def _dequantized_note(quantize: QuantizeConfig, max_logit_change: float) -> str:
    kind = f"{quantize.bits}-bit {quantize.quant_type}" if quantize.bits == 4 else "8-bit LLM.int8()"
    return (
        f"\n## Dequantized\n\nThe run trained on a {kind} base ({quantize.backend}). These weights are its "
        "dequantized values, exactly what the quantized layers computed with, and the unmerged LoRA updates are "
        "added in float, not requantized. The quantized layers computed in lower precision "
        f"({quantize.compute_dtype if quantize.bits == 4 else 'int8 × float16'}), this folder computes in its "
        f"dtype: on a fixed probe text its logits differ from the run's by at most {max_logit_change:.4g}. "
        "`heft.load_run` on the run folder itself rebuilds the quantized model.\n"
    )
