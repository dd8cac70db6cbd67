"""What a user meets around run folders: manifests that point outside the folder, the exported model
card, `heft --version`."""

from __future__ import annotations

import json

import pytest
import yaml

import heft
from heft.cli import main
from heft.io import RunFolderError, export_run, load_run
from test_pipeline import _trained_run


@pytest.mark.parametrize("escape", ["../outside", "/etc", "link"])
def test_manifest_paths_leaving_the_run_folder_are_refused(tmp_path, tiny_model_dir, escape, capsys):
    _, run = _trained_run(tmp_path, tiny_model_dir)
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if escape == "link":  # a symlink inside the folder that leads out of it
        (tmp_path / "elsewhere").mkdir()
        (run / "link").symlink_to(tmp_path / "elsewhere")
    manifest_path.write_text(json.dumps({**manifest, "weights": escape}))
    with pytest.raises(RunFolderError, match="'weights' points outside the run folder"):
        load_run(run)
    capsys.readouterr()
    assert main(["info", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "outside the run folder" in err[0] and len(err) <= 2, err
    manifest_path.write_text(json.dumps({**manifest, "files": {**manifest["files"], "../x": "0" * 64}}))
    with pytest.raises(RunFolderError, match="'files' points outside"):
        load_run(run)


def test_export_writes_a_model_card_with_hub_metadata(tmp_path, tiny_model_dir):
    model, run = _trained_run(tmp_path, tiny_model_dir)
    out = export_run(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "heft" and header["tags"] == ["peft", "lora", "reft"]
    assert header["base_model"] == json.loads((run / "manifest.json").read_text())["base_model"]["id"]
    assert model.weights_sha256 in card
    for stage in model.stages:  # every stage with its method and trainable parameters
        assert f"| {stage.name} | {stage.config.method} |" in card and f"{stage.trainable_params:,}" in card
    assert f'heft.load_run("{out}")' in card
    load_run(out)  # the card does not disturb the folder's manifest


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"heft {heft.__version__}"
