"""The `heft` command: train → eval/predict/info/export round trips, and one-line user errors."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM

import heft.io
import heft.pipeline
from conftest import SHARED_DATA, make_model, make_tokenizer
from heft.api import score
from heft.cli import main, paired_lines, train_table
from heft.io import load_run
from heft.tasks import get_task
from test_train import toy_config, write_toy_boolq

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained_run(tmp_path, tiny_model_dir) -> Path:
    data = write_toy_boolq(tmp_path / "data", 24, 16)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tiny_model_dir, data, tmp_path / "unused")))
    run = tmp_path / "run"
    assert main(["train", str(config), "stages.0.epochs=1", "stages.1.epochs=1", "--output-dir", str(run), "-q"]) == 0
    return run


def test_eval_matches_results_and_predict_answers(trained_run, tmp_path, capsys):
    results = json.loads((trained_run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(trained_run)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["final_accuracy"]

    assert main(["predict", str(trained_run), "--question", "is the cat red", "--passage", "true the cat is red"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same answer by another path: the Python API's first-token scores of the task's own prompt
    query = get_task("boolq").to_query({"question": "is the cat red", "passage": "true the cat is red"})
    bf16 = yaml.safe_load((trained_run / "config.yaml").read_text())["bf16"]
    probs = score(load_run(trained_run), [query.prompt], query.choices, bf16=bf16).softmax(-1)[0]
    assert answer["prediction"] == query.choices[int(probs.argmax())].strip()
    assert answer["probability"] == pytest.approx(float(probs.max()), abs=1e-5)

    queries = tmp_path / "q.jsonl"
    queries.write_text(
        '{"question": "is it blue", "passage": "false it is red"}\n{"question": "a", "passage": "true a"}\n'
    )
    assert main(["predict", str(trained_run), "--input", str(queries), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"question", "passage", "prediction", "probability"} <= set(r) for r in rows)

    assert main(["info", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "0-lora" in out and "merged" in out and "1-loreft" in out


def test_train_summary_pairs_the_final_model_with_its_baselines_within_80_columns(trained_run):
    """results.json compares the final evaluation with zero-shot and the majority class example by example,
    and `heft train`'s table and lines fit an 80-column terminal at their natural width (rendered 200
    wide, so nothing is wrapped for them), with the widest cells of a real run: a merge that moved the loss,
    a rolled-back stage, 2.4M parameters."""
    results = json.loads((trained_run / "results.json").read_text())
    n = results["data"]["eval_examples"]
    assert list(results["paired"]) == ["final_vs_zero_shot", "final_vs_majority_class"]
    assert all(c["examples"] == n and c["p"] <= 1 for c in results["paired"].values())
    results["stages"][1]["rolled_back"] = True
    for stage in results["stages"]:
        stage["trainable_params"] = 2_442_240
    results["stages"][0].update(loss_at_start=4.7954, loss_before_merge=2.2976, loss_at_end=2.2991)  # bf16 merge
    wide = Console(width=200, record=True, file=io.StringIO())
    wide.print(train_table(results, "arc_challenge", 64))
    for line in paired_lines(results):
        wide.print(line, highlight=False, markup=False)
    lines = wide.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert any("4.7954 → 2.2976" in line for line in lines) and any("merged 2.2991" in line for line in lines)
    assert any("rolled back" in line for line in lines)
    assert sum(line.startswith(("  zero-shot ", "  majority class ")) for line in lines) == 2


def test_info_shows_each_stage_end_also_when_only_the_final_model_is_evaluated(tmp_path, tiny_model_dir, capsys):
    data = write_toy_boolq(tmp_path / "data", 24, 16)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tiny_model_dir, data, tmp_path / "unused", eval_every="never")))
    run = tmp_path / "run"
    assert main(["train", str(config), "stages.0.epochs=1", "stages.1.epochs=1", "--output-dir", str(run), "-q"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert [s["accuracy"] for s in results["stages"]] == [None, results["final_accuracy"]]
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "1-loreft" in line)
    assert f"→ {results['final_accuracy']:.4f}" in row


def test_eval_of_a_run_evaluated_on_held_out_training_examples_repeats_its_final_evaluation(
    tmp_path, tiny_model_dir, capsys
):
    """data.eval_split: train evaluates on examples held out of training; `heft eval` rebuilds the same ones."""
    data = write_toy_boolq(tmp_path / "data", 40, 8)
    config = tmp_path / "toy.yaml"
    config.write_text(
        yaml.safe_dump(
            toy_config(
                tiny_model_dir,
                data,
                tmp_path / "unused",
                data={"source": str(data), "eval_split": "train"},
                max_eval_examples=16,
            )
        )
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "stages.0.epochs=1", "stages.1.epochs=1", "--output-dir", str(run), "-q"]) == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n"], result["correct"]) == (16, final["eval_correct"])


def test_eval_generate_mode_parses_answers(trained_run, capsys, monkeypatch):
    """A model that answers the same to every question: " yes" and " no" are parsed, and every
    question is right under exactly one of them; " perhaps" is parsed as nothing and never right."""
    accuracy = {}
    for reply in (" yes", " no", " perhaps"):

        def generate(self, ids, mask, reply=reply, **options):
            tokens = torch.tensor(self.tokenizer(reply, add_special_tokens=False)["input_ids"], device=ids.device)
            return torch.cat([ids, tokens.expand(ids.shape[0], -1)], dim=1)

        monkeypatch.setattr(heft.pipeline.HeftModel, "generate", generate)
        capsys.readouterr()
        assert main(["eval", str(trained_run), "--mode", "generate", "--max-examples", "8"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["mode"], result["n"], result["unparsed"]) == ("generate", 8, 8 if reply == " perhaps" else 0)
        accuracy[reply] = result["accuracy"]
    assert accuracy[" yes"] + accuracy[" no"] == pytest.approx(1) and accuracy[" perhaps"] == 0


def test_export_is_a_plain_hf_model_plus_interventions(trained_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(trained_run), str(out)]) == 0
    assert (
        (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "HEFT_EXPORT.md").is_file()
    )
    original, exported = load_run(trained_run), load_run(out)
    ids = torch.randint(3, 20, (2, 9))
    with torch.no_grad():
        a = original.lm_head(original(ids).hidden_states)
        b = exported.lm_head(exported(ids).hidden_states)
    assert (a - b).abs().max() <= 1e-5
    assert [s.config.method for s in exported.stages] == ["loreft"]
    plain = AutoModelForCausalLM.from_pretrained(out)  # the merged weights, without heft
    assert plain.config.num_hidden_layers == original.model.config.num_hidden_layers


def test_base_model_option_loads_a_moved_copy_and_refuses_other_weights(trained_run, tiny_model_dir, tmp_path, capsys):
    results = json.loads((trained_run / "results.json").read_text())
    moved = tiny_model_dir.rename(tmp_path / "moved-copy")  # the id the run recorded no longer exists
    capsys.readouterr()
    assert main(["eval", str(trained_run)]) == 2
    assert main(["eval", str(trained_run), "--base-model", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["final_accuracy"]
    other = tmp_path / "other"
    make_model("llama", seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    assert main(["export", str(trained_run), str(tmp_path / "export"), "--base-model", str(other)]) == 2
    assert "refusing to combine them" in capsys.readouterr().err


def test_export_creates_missing_folders_and_leaves_nothing_when_it_fails(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "new" / "folder" / "export"
    assert main(["export", str(trained_run), str(out)]) == 0 and (out / "HEFT_EXPORT.md").is_file()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(heft.io, "save_run", full_disk)
    assert main(["export", str(trained_run), str(tmp_path / "new" / "second")]) == 2
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["folder"]  # no half-written copy beside it


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "configs/boolq_heft.yaml", "stages.0.epoch=3"], "did you mean 'epochs'"),
        (["train", "configs/boolq_heft.yaml", "batch_size=abc"], "batch_size"),
        (
            ["train", "configs/boolq_heft.yaml", "task=boolqq", "--output-dir", "{tmp}/r"],
            "unknown task 'boolqq' in override 'task=boolqq'; did you mean 'boolq'?",
        ),  # checked where the task is resolved, before a run folder exists
        (["train", "configs/nope.yaml"], "nope.yaml"),
        (
            [
                "train",
                "configs/boolq_heft.yaml",
                "model=/no/such/model",
                "data.source={tmp}/data",
                "--output-dir",
                "{tmp}/r",
            ],
            "/no/such/model",
        ),  # valid data: it is read before the model
        (["eval", "{tmp}"], "not a heft run folder"),
    ],
)
def test_user_errors_are_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    write_toy_boolq(tmp_path / "data")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    out = capsys.readouterr().err
    assert expected in out and "Traceback" not in out
    assert out.startswith("error:") and len(out.strip().splitlines()) <= 2


@pytest.mark.parametrize(
    "file, content, error, hint",
    [
        (
            "train.jsonl",
            b'{"question": "q", "passage": "p", "answer": true}\n{"question": "q", "passage"\n',
            "train.jsonl: line 2: invalid JSON",
            "fix line 2 of",
        ),
        (
            "validation.csv",
            "question,passage,answer\nis it,caf\xe9 au lait,true\n".encode("latin-1"),
            "validation.csv: row 1 (line 2): field 'passage' (column 'passage'): not valid UTF-8",
            "validation.csv as UTF-8",
        ),
        (
            "train.jsonl",
            b'{"query": "q", "passage": "p", "answer": true}\n',
            "train.jsonl: line 1: missing column 'question'",
            "data.columns.question=<column>",
        ),
        (
            "train.csv",
            "question,passage,answer\nis it,café,true\n".encode("utf-16"),
            "train.csv: UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8",
            "iconv -f UTF-16 -t UTF-8",
        ),
        (
            "train.jsonl",
            '{"question": "q", "passage": "p", "answer": true}\n'.encode("utf-16-be"),
            "train.jsonl: line 1: a NUL byte; the file looks UTF-16 or binary",
            "train.jsonl as UTF-8",
        ),
    ],
    ids=["broken-json", "not-utf8", "missing-column", "utf16-csv", "utf16-jsonl-no-bom"],
)
def test_bad_data_fails_before_the_model_loads_with_a_hint_for_its_cause(file, content, error, hint, tmp_path, capsys):
    """Either split; the model path does not exist, so a model loaded first would fail differently."""
    data = write_toy_boolq(tmp_path / "data", 8, 8)
    (data / f"{file.split('.')[0]}.parquet").unlink()
    (data / file).write_bytes(content)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tmp_path / "no-such-model", data, tmp_path / "run")))
    assert main(["train", str(config), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and error in lines[0] and lines[1].startswith("hint:") and hint in lines[1], lines
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_real_model_end_to_end(tmp_path):
    """`heft train` with the default model on 64 BoolQ examples, then `heft eval` and `heft predict`."""
    assert (SHARED_DATA / "train.parquet").is_file(), f"BoolQ data missing at {SHARED_DATA}"
    env = {**os.environ, "HEFT_DATA_DIR": str(SHARED_DATA.parent)}
    run = tmp_path / "run"

    def heft(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "heft", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = heft(
        "train",
        "configs/boolq_heft.yaml",
        "max_train_examples=64",
        "max_eval_examples=32",
        "max_length=160",
        "stages.0.epochs=1",
        "stages.1.epochs=1",
        "--output-dir",
        str(run),
        "-q",
    )
    assert "zero-shot" in out and str(SHARED_DATA.resolve()) in out  # the source, as an absolute path
    results = json.loads((run / "results.json").read_text())
    assert results["data"]["train_examples"] == 64 and 0 <= results["final_accuracy"] <= 1
    assert json.loads(heft("eval", str(run)))["accuracy"] == results["final_accuracy"]
    answer = json.loads(
        heft(
            "predict",
            str(run),
            "--question",
            "is paris the capital of france",
            "--passage",
            "Paris is the capital and largest city of France.",
        )
        .strip()
        .splitlines()[-1]
    )
    assert answer["prediction"] in {"yes", "no"}


def test_data_parallel_two_cpu_processes(tmp_path, tiny_model_dir):
    """Data-parallel training (2 CPU processes, gloo, launched by torchrun): half the steps each."""
    data = write_toy_boolq(tmp_path / "data", 32, 16)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tiny_model_dir, data, tmp_path / "unused")))
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "heft",
        "train",
        str(config),
        "--output-dir",
        str(run),
        "-q",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["optimizer_steps"] == 4 * 2  # 32 examples / batch 8 / 2 processes = 2 steps per epoch, 4 epochs
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert results["train_tokens"] == last["tokens_seen"] > 0, "tokens are summed over both processes"
    load_run(run)


def test_eval_runs_on_the_launch_device_and_ranks_share_the_run_folder(monkeypatch):
    """`heft eval`/`predict` put the model on accelerate's device (a GPU when there is one, also in
    one process); `heft train` under a launcher takes the main process's time-stamped folder."""
    from types import SimpleNamespace

    import accelerate.utils

    import heft.evaluate
    import heft.io
    from heft.cli import _load_for_eval, _output_dir

    moved = []
    fake_model = SimpleNamespace(to=lambda device: moved.append(device) or "model on device")
    state = SimpleNamespace(num_processes=1, device=torch.device("cuda", 0), is_main_process=True)
    monkeypatch.setattr(heft.evaluate, "process_state", lambda: state)
    monkeypatch.setattr(heft.io, "load_run", lambda run_dir, base_model=None, zero_shot=False: fake_model)
    assert _load_for_eval(Path("run")) == ("model on device", True) and moved == [torch.device("cuda", 0)]

    cfg = SimpleNamespace(task="boolq", model="models/tiny", output_dir="runs/{task}-{model}")
    assert _output_dir("given", cfg) == "given"
    assert _output_dir(None, cfg) == "runs/boolq-tiny"
    state.num_processes = 2
    cfg.output_dir = "runs/{task}-{time}"
    monkeypatch.setattr(
        accelerate.utils, "broadcast_object_list", lambda objects, from_process: ["runs/main-process-name"]
    )
    assert _output_dir(None, cfg) == "runs/main-process-name"


def test_quiet_hides_the_libraries_progress_bars_too(tmp_path, tiny_model_dir, capfd):
    from transformers.utils import logging as transformers_logging

    data = write_toy_boolq(tmp_path / "data", 8, 8)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tiny_model_dir, data, tmp_path / "unused")))
    try:
        assert (
            main(
                [
                    "train",
                    str(config),
                    "stages.0.epochs=1",
                    "stages.1.epochs=1",
                    "--output-dir",
                    str(tmp_path / "run"),
                    "-q",
                ]
            )
            == 0
        )
        assert "Loading weights" not in capfd.readouterr().err
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()


def test_an_interrupt_ends_with_status_130_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """`heft train` names the time-stamped folder to resume into: rerunning the command would start a new one."""
    import heft.cli
    import heft.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(heft.train, "run_training", interrupted)
    monkeypatch.chdir(REPO)
    assert main(["train", "configs/boolq_heft.yaml", "seed=3", "-q"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    resume = re.search(r"resume with (heft train configs/boolq_heft.yaml seed=3 --output-dir (\S+))", err)
    assert resume and re.fullmatch(r"runs/boolq-heft-\d{8}-\d{6}", resume.group(2)), err
    monkeypatch.setattr(heft.cli, "cmd_info", interrupted)
    assert main(["info", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"  # nothing to resume


def test_heft_train_prints_no_library_notice(tmp_path, tiny_model_dir):
    """A run without quantization still imports bitsandbytes (peft does, when it is installed), whose
    import warns of an optional kernel heft never uses; `heft train` must not print it, nor anything else
    on stderr under -q but heft's own log lines."""
    data = write_toy_boolq(tmp_path / "data", 8, 8)
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config(tiny_model_dir, data, tmp_path / "run", eval_zero_shot=False)))
    args = ["train", str(config), "stages.0.epochs=1", "stages.1.epochs=1", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(heft.io.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "heft", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels-community" not in done.stdout + done.stderr
    foreign = [line for line in done.stderr.splitlines() if not line.startswith("INFO heft: ")]
    assert not foreign, foreign
    imported = subprocess.run([sys.executable, "-c", "import heft.api"], env=env, capture_output=True, text=True)
    assert imported.returncode == 0 and imported.stderr == "", imported.stderr[-3000:]  # the Python API too
