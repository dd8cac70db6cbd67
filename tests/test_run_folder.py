"""Faults around a run folder: a second writer, a killed holder, a save on a full or read-only disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import pytest
import safetensors
import torch
import yaml

import heft.files
import heft.io
import heft.train as train_module
from heft.cli import main
from heft.io import LOCK_PID, RunFolderBusy, SaveError, load_run, read_trainer_state, run_folder_lock, save_run
from heft.models import load_model
from heft.pipeline import HeftModel
from heft.reproduce import reproduce
from test_pipeline import LORA, LOREFT, batch_of, toy_data, train
from test_reproduce import CONFIG
from test_train import EXPECTED_LINES, line_keys, toy_config, write_toy_boolq

HOLD = (
    "import sys, time\nfrom heft.io import run_folder_lock\nwith run_folder_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n    time.sleep(600)\n"
)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_second_writer_gets_one_line_with_the_holder_and_kill_9_frees_the_folder(tmp_path, tiny_model_dir, capsys):
    data = write_toy_boolq(tmp_path / "data", 16, 8)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tiny_model_dir, data, tmp_path / "unused")))
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        capsys.readouterr()
        assert main(["train", str(config), "--output-dir", str(run), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 2 and "Traceback" not in err
        assert str(run) in err.splitlines()[0] and f"pid {holder.pid}" in err.splitlines()[0]
        assert snapshot(run) == before, "the refused writer must write nothing"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            reproduce(str(CONFIG), ["preset=smoke"], output_dir=str(run))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_folder_lock(run):  # the kernel dropped the dead holder's flock: no stale lock to clean up
        assert (run / LOCK_PID).read_text().strip() == str(os.getpid())
    assert not (run / LOCK_PID).exists()


class DiskFull:
    """Fails the n-th write of a save (1-based) as a full disk does: a file keeps the bytes written
    before the error, a rename does not happen. With n = None it only counts the writes."""

    def __init__(self, n: int | None, code: int = errno.ENOSPC) -> None:
        self.n, self.code, self.count = n, code, 0

    def due(self) -> bool:
        self.count += 1
        return self.count == self.n

    def error(self, *filename: str) -> OSError:
        return OSError(self.code, os.strerror(self.code), *filename)

    @contextmanager
    def active(self) -> Iterator[None]:
        real_replace, real_save = os.replace, peft.LoraConfig.save_pretrained
        fault = self

        class HalfWritten:
            """An open file whose write stores half the data, then fails (without a filename, as Python's)."""

            def __init__(self, handle) -> None:
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.handle.close()

            def write(self, data: bytes) -> None:
                self.handle.write(data[: len(data) // 2])
                raise fault.error()

        def open_(path, mode="r", *args, **kwargs):
            handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 (returned to the caller)
            return HalfWritten(handle) if "w" in mode and fault.due() else handle

        def replace(src, dst) -> None:
            if fault.due():
                raise fault.error(str(src))
            real_replace(src, dst)

        def save_pretrained(config, folder, **kwargs) -> None:
            if fault.due():
                (Path(folder) / "adapter_config.json").write_text('{"r": ')
                raise fault.error(str(Path(folder) / "adapter_config.json"))
            real_save(config, folder, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(heft.files, "open", open_, raising=False)  # where the run folder's files are written
            patch.setattr(heft.io.os, "replace", replace)
            patch.setattr(peft.LoraConfig, "save_pretrained", save_pretrained)
            yield


def logits(model: HeftModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.lm_head(model(**batch_of(toy_data(8, seed=1))).hidden_states)


def test_a_save_failing_at_any_write_leaves_the_previous_checkpoint(tmp_path, tiny_model_dir):
    model, data = HeftModel(load_model(str(tiny_model_dir))), toy_data()
    train(model, LORA, data)
    model.add_stage(LOREFT, seed=0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)

    def step() -> None:
        model.train()
        optimizer.zero_grad()
        model(**batch_of(data)).loss.backward()
        optimizer.step()

    step()
    run = tmp_path / "run"
    save_run(model, run, 0, 1, optimizer, {"progress": {"epoch": 1}})
    previous, folders, state = logits(load_run(run)), sorted((run / "weights").iterdir()), read_trainer_state(run)
    for file in (run / "weights").rglob("*.safetensors"):  # weights and optimizer state: no d × d tensor
        with safetensors.safe_open(file, "pt") as saved:
            assert all(saved.get_slice(key).get_shape() != [32, 32] for key in saved.keys()), file  # noqa: SIM118
    step()
    probe = DiskFull(None)
    with probe.active():
        save_run(model, tmp_path / "probe", 0, 2, optimizer, {"progress": {"epoch": 2}})
    assert (
        probe.count >= 9
    )  # adapter config + tensors, interventions + config, optimizer, trainer state, renames, manifest
    for n in range(1, probe.count + 1):
        with DiskFull(n).active(), pytest.raises(SaveError) as failure:
            save_run(model, run, 0, 2, optimizer, {"progress": {"epoch": 2}})
        message = str(failure.value)
        assert "\n" not in message and str(run) in message and "No space left on device" in message, message
        assert "the save needs about" in message and "the previous save is kept" in message
        assert sorted((run / "weights").iterdir()) == folders, f"write {n}: partial files left behind"
        assert read_trainer_state(run) == state
        assert torch.equal(logits(load_run(run)), previous), f"write {n}: the folder no longer loads as before"
    save_run(model, run, 0, 2, optimizer, {"progress": {"epoch": 2}})  # space is back: the same save works
    assert read_trainer_state(run)["progress"] == {"epoch": 2}
    assert (logits(load_run(run)) - logits(model)).abs().max() <= 1e-5


def test_an_interrupt_just_after_the_manifest_is_written_keeps_the_new_save(tmp_path, tiny_model_dir, monkeypatch):
    model = HeftModel(load_model(str(tiny_model_dir)))
    model.add_stage(LOREFT, seed=0)
    run = tmp_path / "run"
    save_run(model, run, 0, 1, torch.optim.AdamW(model.trainable_parameters()), {"progress": {"epoch": 1}})
    write_json = heft.io.write_json

    def interrupted_after(path, data):
        write_json(path, data)
        if path.name == "manifest.json":
            raise KeyboardInterrupt  # after the manifest's rename, before write_json returns

    monkeypatch.setattr(heft.io, "write_json", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        save_run(model, run, 0, 2, torch.optim.AdamW(model.trainable_parameters()), {"progress": {"epoch": 2}})
    monkeypatch.undo()
    assert read_trainer_state(run)["progress"] == {"epoch": 2}
    load_run(run)  # the folder the manifest names is still there


@pytest.mark.parametrize("code, text", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")])
def test_read_only_or_forbidden_folder_is_one_line_without_size(tmp_path, tiny_model_dir, code, text):
    model = HeftModel(load_model(str(tiny_model_dir)))
    model.add_stage(LOREFT, seed=0)
    with DiskFull(1, code).active(), pytest.raises(SaveError) as failure:
        save_run(model, tmp_path / "run", 0)
    message = str(failure.value)
    assert text in message and "interventions.safetensors" in message and "needs about" not in message, message
    assert not any((tmp_path / "run" / "weights").iterdir())


def test_train_after_a_failed_save_resumes_from_the_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = write_toy_boolq(tmp_path / "data", 16, 8)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tiny_model_dir, data, tmp_path / "unused")))
    run, calls = tmp_path / "run", {"n": 0}

    def full_disk_at_third_checkpoint(*args, **kwargs):
        calls["n"] += 1
        with DiskFull(3 if calls["n"] == 3 else None).active():
            return save_run(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_run", full_disk_at_third_checkpoint)
    argv = ["train", str(config), "--output-dir", str(run), "-q"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err  # after the model's loading bar
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("hint:")
    error = err.strip().splitlines()[-2]
    assert error.startswith(f"error: could not save {run}: No space left on device") and "the save needs about" in error
    progress = read_trainer_state(run)["progress"]
    assert (progress["stage"], progress["epoch"]) == (1, 0), "the last good checkpoint: end of stage 0"
    assert not list((run / "weights").glob(".tmp-*"))
    monkeypatch.setattr(train_module, "save_run", save_run)
    assert main(argv) == 0
    assert line_keys(run) == EXPECTED_LINES
    assert json.loads((run / "results.json").read_text())["optimizer_steps"] == 8
