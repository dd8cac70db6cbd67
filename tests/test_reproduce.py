"""`heft reproduce`: the real config's presets, override precedence, the summary/report/plots of a
tiny end-to-end run, skipping finished arms, resuming an interrupted one, and the smoke preset."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

import heft.reproduce.run as reproduce_module
import heft.train as train_module
from conftest import SHARED_DATA
from heft.config import ConfigError
from heft.io import RunFolderBusy, load_run, run_folder_lock
from heft.provenance import checkpoint_hash, eval_set_hash
from heft.reproduce import load_plan, reproduce
from heft.reproduce.compare import EvalSetMismatch, compare_arms
from heft.reproduce.report import milestones, render_report
from heft.reproduce.run import plan_jobs
from heft.reproduce.summary import _mean_curve
from heft.train import run_training
from test_train import write_toy_boolq

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reproduce_boolq.yaml"
ARMS = ["lora-20", "loreft-20", "heft-2+1", "lora-3", "loreft-3", "joint-3", "heft-1+2", "heft-2+1-identity"]
EPOCHS = {
    "lora-20": [20],
    "loreft-20": [20],
    "heft-2+1": [2, 1],
    "lora-3": [3],
    "loreft-3": [3],
    "joint-3": [3],
    "heft-1+2": [1, 2],
    "heft-2+1-identity": [2, 1],
}
SMOKE_EPOCHS = {
    "lora-20": [2],
    "loreft-20": [2],
    "heft-2+1": [1, 1],
    "lora-3": [1],
    "loreft-3": [1],
    "joint-3": [1],
    "heft-1+2": [1, 1],
    "heft-2+1-identity": [1, 1],
}


def epochs_of(plan, arm: str) -> list[float]:
    return [s.epochs for s in plan.configs[arm][plan.seeds[0]].stages]


@pytest.mark.parametrize("preset", ["smoke", "cpu", "full"])
def test_real_config_defines_every_arm_for_every_preset(preset):
    plan = load_plan(CONFIG, [f"preset={preset}"])
    assert list(plan.configs) == ARMS == plan.selected
    assert plan.output_dir == Path(f"runs/reproduce-{preset}")
    expected = SMOKE_EPOCHS if preset == "smoke" else EPOCHS
    assert {arm: epochs_of(plan, arm) for arm in ARMS} == expected
    assert plan.nominal_epochs == EPOCHS
    for arm in ("heft-2+1", "heft-1+2", "heft-2+1-identity"):
        assert [s.method for s in plan.configs[arm][plan.seeds[0]].stages] == ["lora", "loreft"]
    assert plan.configs["heft-2+1"][plan.seeds[0]].stages[1].reft.init == "random", "the paper's setting"
    assert plan.configs["heft-2+1-identity"][plan.seeds[0]].stages[1].reft.init == "identity"
    if preset != "smoke":  # the two HEFT 2+1 arms share their LoRA stage
        assert plan.prefixes["heft-2+1"] is plan.prefixes["heft-2+1-identity"] and set(plan.prefixes) == {
            "heft-2+1",
            "heft-2+1-identity",
        }
    shared = {
        (c.model, c.max_length, c.max_train_examples, c.max_eval_examples, c.data.source, c.bf16)
        for by_seed in plan.configs.values()
        for c in by_seed.values()
    }
    assert len(shared) == 1, "every arm must share model, data, subsample and max length"
    zero_shot = [arm for arm in ARMS if plan.configs[arm][plan.seeds[0]].eval_zero_shot]
    assert zero_shot == ["lora-20"]
    cfg = plan.configs["lora-20"][plan.seeds[0]]
    assert cfg.model == "smollm2-135m" and cfg.data.source is None and cfg.eval_every == "epoch"
    sizes = {"smoke": (16, 16, 96, [1]), "cpu": (128, 128, 192, [1]), "full": (None, None, 512, [1, 2, 3])}[preset]
    assert (cfg.max_train_examples, cfg.max_eval_examples, cfg.max_length, plan.seeds) == sizes


def test_overrides_win_over_the_preset_and_errors_are_one_line():
    plan = load_plan(
        CONFIG,
        [
            "preset=full",
            "seeds=[4]",
            "base.max_length=64",
            "arms.lora-3.stages.0.lr=1e-4",
            "arms_only=[lora-3, heft-2+1]",
        ],
    )
    assert plan.seeds == [4] and plan.configs["lora-3"][4].max_length == 64
    assert plan.configs["lora-3"][4].stages[0].lr == 1e-4 and plan.configs["lora-20"][4].stages[0].lr == 3e-4
    assert plan.selected == ["heft-2+1", "lora-3"]  # in the file's order
    assert plan.configs["heft-2+1"][4].eval_zero_shot  # the first arm this call runs
    cases = {
        "sedes=[1]": "did you mean 'seeds'?",
        "preset=gpu": "expected one of smoke, cpu, full",
        "arms_only=[lora20]": "did you mean 'lora-20'?",
        "base.seed=3": "set by reproduce per arm",
        "base.max_lenght=9": "did you mean 'max_length'?",
        "presets.cpu.epochs.lora-3=[1,2]": "a list of 1 epoch count(s)",
        "presets.cpu.epochs.lora-2=[1]": "did you mean 'lora-20'?",
        "primary=[lora-3,lora-3]": "an [arm, baseline] pair of two arm names",
        "selected_on.split=test": "expected eval or dev",
        "selected_on.arms=[lora-2]": "a non-empty list of arm names",
        "paper.arms.lora-20.accuracy=high": "expected a number",
        "paper.method.arms=x": "did you mean 'arm'?",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_plan(CONFIG, [override])
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


# ------------------------------------------------------------------------------ tiny end to end
def tiny_reproduce_file(tmp_path: Path, model_dir: Path) -> Path:
    """Four arms named like the paper's, scaled down by a preset, on the tiny model and toy data."""
    lora = {"method": "lora", "epochs": 20, "lr": 2e-2, "lora": {"r": 4, "dropout": 0.0}}
    loreft = {"method": "loreft", "epochs": 20, "lr": 2e-2, "reft": {"rank": 2, "positions": "f1+l1"}}
    spec = {
        "preset": "tiny",
        "output_dir": str(tmp_path / "out-{preset}"),
        "seeds": [1],
        "base": {
            "model": str(model_dir),
            "data": {"source": str(write_toy_boolq(tmp_path / "data"))},
            "max_length": 32,
            "batch_size": 8,
            "eval_batch_size": 8,
        },
        "presets": {"tiny": {"epochs": {"lora-20": [2], "loreft-20": [1], "joint-3": [1]}}},
        "arms": {
            "lora-20": {"stages": [lora]},
            "loreft-20": {"stages": [loreft]},
            "heft-2+1": {"stages": [{**lora, "epochs": 2}, {**loreft, "epochs": 1}]},
            "joint-3": {"stages": [{**lora, **loreft, "method": "joint", "epochs": 3}]},
        },
        "paper": yaml.safe_load(CONFIG.read_text())["paper"],
    }
    path = tmp_path / "reproduce.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[tuple]:
    """(stage index, epoch) of the evaluations after epochs and of zero-shot."""
    return [
        (m["stage_index"], m["epoch"])
        for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if m["kind"] == "eval"
    ]


def test_summary_report_and_plots_from_exact_run_numbers(tmp_path, tiny_model_dir, monkeypatch):
    path = tiny_reproduce_file(tmp_path, tiny_model_dir)
    summary = reproduce(str(path), show_progress=False)
    out = tmp_path / "out-tiny"
    assert list(summary["arms"]) == ["lora-20", "loreft-20", "heft-2+1", "joint-3"] and not summary["missing"]
    heft = summary["arms"]["heft-2+1"]
    assert [c["epoch"] for c in heft["curve"]] == [1, 2, 3]
    run = heft["seeds"]["1"]
    assert [(c["stage"], c["method"]) for c in run["curve"]] == [("0-lora", "lora")] * 2 + [("1-loreft", "loreft")]
    results = json.loads((out / "heft-2+1" / "seed-1" / "results.json").read_text())
    assert sum(c["epoch_train_tokens"] for c in run["curve"]) == run["train_tokens"] == results["train_tokens"] > 0
    assert run["optimizer_steps"] == 6 * 3 and run["eval_tokens"] == results["eval_tokens"]
    assert [p["trainable_params"] for p in run["trainable_params"]] == [
        s["trainable_params"] for s in results["stages"]
    ]
    assert run["final_accuracy"] == run["curve"][-1]["accuracy"] == results["final_accuracy"]
    assert run["best_accuracy"] == max(c["accuracy"] for c in run["curve"])
    assert [len(a["curve"]) for a in summary["arms"].values()] == [2, 1, 3, 1]
    for arm in summary["arms"].values():
        assert all(0 <= c["accuracy"]["mean"] <= 1 for c in arm["curve"])
    # zero-shot: evaluated by the first arm only, and reported once
    assert read_metrics(out / "loreft-20" / "seed-1") == [(0, 1)]
    assert read_metrics(out / "lora-20" / "seed-1") == [(-1, None), (0, 1), (0, 2)]
    # heft-2+1 continued from the LoRA stage it shares with lora-20: its copy holds that stage's lines
    assert read_metrics(out / "heft-2+1" / "seed-1") == [(-1, None), (0, 1), (0, 2), (1, 1)]
    # what each arm branched from comes from its run: the prefix's checkpoint, device and commit
    prefix_dir = out / "_prefix" / heft["branched_from"]["planned"] / "seed-1"
    branched = json.loads((prefix_dir / "results.json").read_text())
    assert heft["branched_from"]["stages"] == 1 and heft["branched_from"]["recorded"]["1"] == {
        "prefix": heft["branched_from"]["planned"],
        "stages": 1,
        "run_dir": str(prefix_dir),
        "checkpoint": checkpoint_hash(prefix_dir),
        "device": branched["device"],
        "commit": branched["commit"],
        "eval_set_hash": branched["eval_set_hash"],
    }
    assert results["branched_from"] == heft["branched_from"]["recorded"]["1"]
    assert summary["arms"]["lora-20"]["branched_from"] == heft["branched_from"]  # one prefix, one checkpoint
    assert summary["arms"]["joint-3"]["branched_from"] is None
    # provenance: the evaluation examples in order, their set's hash, the commit; in results and summary
    ids = results["eval_example_ids"]
    assert len(ids) == len(set(ids)) == 24 and results["eval_set_hash"] == eval_set_hash(ids)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", results["commit"]), "tests run from a git checkout"
    assert run["eval_set_hash"] == results["eval_set_hash"] and run["commit"] == results["commit"]
    assert "eval_example_ids" not in run and summary["eval_sets"] == {results["eval_set_hash"]: ids}
    assert all(c["pairing"] == "example ids recorded by the runs" for c in summary["comparisons"])
    assert summary["provenance"] == {
        "comparisons": 4,
        "cross_device": 0,
        "device_not_recorded": 0,
        "cross_commit": 0,
        "commit_not_recorded": 0,
        "prefix_contradicted": 0,
    }
    assert next(c for c in summary["comparisons"] if c["a"] == "heft-2+1")["prefix"]["seeds"] == {
        "1": "same checkpoint"
    }
    pairs = [(c["a"], c["b"]) for c in summary["comparisons"]]
    assert pairs == [("loreft-20", "lora-20"), ("heft-2+1", "lora-20"), ("joint-3", "lora-20")]
    for c in summary["comparisons"]:
        a, b = (summary["arms"][x]["seeds"]["1"]["final_accuracy"] for x in (c["a"], c["b"]))
        assert c["difference"] == pytest.approx(a - b) and c["low"] <= c["difference"] <= c["high"]
    [gain] = summary["last_stage_gains"]  # the one multi-stage arm, against its own LoRA stage's end
    lora_end = next(c["accuracy"] for c in run["curve"] if c["epoch"] == 2)
    assert (gain["a"], gain["b"]) == ("heft-2+1", "its lora stage")
    assert gain["difference"] == pytest.approx(run["final_accuracy"] - lora_end)
    boundary = run["boundaries"][1]
    assert boundary["loss_at_start"] == pytest.approx(run["boundaries"][0]["loss_at_end"], abs=1e-6)
    assert 0 <= summary["zero_shot_accuracy"]["mean"] <= 1 and summary["zero_shot_accuracy"]["std"] is None
    assert summary["data"]["train_examples"] == 48 and summary["data"]["eval_examples"] == 24
    assert summary["versions"]["heft"] and summary["machine"]["cpu_count"] and summary["command"]
    assert results["device"]["type"] == "cpu" and summary["trained_on"] == [f"cpu ({results['device']['name']})"]
    assert all(a["trained_on"] == summary["trained_on"] for a in summary["arms"].values())
    assert json.loads((out / "summary.json").read_text()) == summary

    report = (out / "report.md").read_text()
    rows = report.splitlines()
    for c in summary["comparisons"]:  # each row from the per-example records, recounted here
        a, b = (summary["arms"][x]["seeds"]["1"]["final_correct"] for x in (c["a"], c["b"]))
        a_only, b_only = sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))
        assert any(
            r.startswith(f"| {c['a']} | {c['b']} | {100 * (a_only - b_only) / len(a):+.2f} | ")
            and f"| {a_only} / {b_only} |" in r
            for r in rows
        ), c
    for arm in ("heft-2+1", "joint-3"):  # the 3-epoch arms: one seed, so no ± in the equal-budget table
        final = summary["arms"][arm]["seeds"]["1"]["final_accuracy"]
        assert any(r.startswith(f"| {arm} | ") and f" | {100 * final:.2f} | " in r for r in rows), arm
    for text in (
        "85.17",
        "85.05",
        "83.36",
        "Equal budget",
        "heft-2+1",
        "Paired comparisons",
        "McNemar",
        "What the last stage adds",
        "heft-2+1 − its lora stage",
        "Stage boundaries",
        "majority class",
        f"trained on {summary['trained_on'][0]}",
        f"| {summary['trained_on'][0]} |",
    ):
        assert text in report
    for name in ("accuracy_vs_epoch.png", "accuracy_vs_tokens.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # on another task the paper's numbers are named as BoolQ's, not as this task's
    elsewhere = render_report({**summary, "task": "arc_easy"})
    assert (
        "9,427" not in elsewhere
        and "reports BoolQ only" in elsewhere
        and "BoolQ margin of HEFT over lora-20" in elsewhere
    )
    assert "9,427" in report and "BoolQ margin" not in report

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(reproduce_module, "run_training", no_training)
    assert reproduce(str(path), show_progress=False) == summary


COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results"
LEGACY = ("cpu", "full-h100-partial")
"""Summaries from before per-example records, devices and stage boundaries: their reports came from
an older renderer and stay as committed. (`heft reproduce` writes summary.json; other tools' records
have other names.)"""


@pytest.mark.parametrize(
    "folder",
    sorted(
        str(p.parent.relative_to(COMMITTED))
        for p in COMMITTED.rglob("summary.json")
        if str(p.parent.relative_to(COMMITTED)) not in LEGACY
    ),
)
def test_committed_summary_regenerates_its_report_byte_for_byte(folder, tmp_path, monkeypatch):
    """--report-only on a folder holding only a summary.json re-reads its per-run records: the
    committed report comes back identical, so what it says follows from the committed records."""
    committed = json.loads((COMMITTED / folder / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps(committed))
    monkeypatch.chdir(COMMITTED.parents[1])  # the summary names its config relative to the repository
    monkeypatch.setattr(reproduce_module, "run_training", lambda *a, **k: pytest.fail("trained"))
    summary = reproduce(committed["config"], committed["overrides"], str(tmp_path), show_progress=False, train=False)
    assert (tmp_path / "report.md").read_text() == (COMMITTED / folder / "report.md").read_text()
    assert summary["arms"] == committed["arms"] and summary["reread"]["config"] == committed["config"]


def test_committed_openbookqa_flags_devices_and_the_prefix_its_runs_contradict():
    """Re-read under the new rules: the seeds score the same 500 questions (whole test split), the
    H200 arms pair with CPU arms across devices, and the identity arm did not start from heft-2+1's
    LoRA stage although the plan branches both off one prefix."""
    committed = json.loads((COMMITTED / "multiple-choice" / "openbookqa" / "summary.json").read_text())
    pairs = {(c["a"], c["b"]): c for c in committed["comparisons"]}
    assert all(c["unit"] == "questions" and c["questions"] == 500 and c["examples"] == 1000 for c in pairs.values())
    assert pairs["loreft-3", "loreft-20"]["cross_device_seeds"] == [1, 2]  # H200 against the CPU
    assert pairs["heft-2+1-identity", "lora-20"]["cross_device_seeds"] == []  # two CPU runs
    assert pairs["heft-2+1", "lora-3"]["device_not_recorded_seeds"] == [1, 2]
    assert pairs["heft-2+1-identity", "heft-2+1"]["prefix"]["seeds"] == {"1": "records differ", "2": "records differ"}
    assert committed["provenance"]["prefix_contradicted"] == 1 and committed["provenance"]["cross_device"] > 0


def test_pairing_refuses_runs_evaluated_on_different_example_sets():
    run = {"run_dir": "out/a/seed-1", "final_correct": "0110", "eval_set_hash": "1" * 64}
    summary = {
        "data": {"max_eval_examples": None, "eval_split": "validation"},
        "eval_sets": {"1" * 64: ["q1", "q2", "q3", "q4"]},
        "arms": {"a": {"seeds": {"1": run}}, "b": {"seeds": {"1": {**run, "run_dir": "out/b/seed-1"}}}},
    }
    assert compare_arms(summary, "a", "b")["pairing"] == "example ids recorded by the runs"
    other = copy.deepcopy(summary)
    other["arms"]["b"]["seeds"]["1"]["eval_set_hash"] = "2" * 64
    with pytest.raises(EvalSetMismatch) as info:
        compare_arms(other, "a", "b")
    message = str(info.value)
    assert "out/a/seed-1 and out/b/seed-1 (seed 1) evaluated different example sets" in message and "\n" not in message


def test_interrupted_arm_resumes_and_summary_is_complete(tmp_path, tiny_model_dir, monkeypatch):
    path = tiny_reproduce_file(tmp_path, tiny_model_dir)
    out = tmp_path / "out-tiny"
    original, calls = train_module.save_run, {"n": 0}

    def crash_in_heft(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 + 1 + 2 + 1:  # shared LoRA prefix: 2 checkpoints + final save; lora-20 (branched): final
            raise KeyboardInterrupt  # save; loreft-20: 1 + 1; then heft-2+1 (branched) dies saving its LoReFT epoch
        original(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_run", crash_in_heft)
    with pytest.raises(KeyboardInterrupt):
        reproduce(str(path), show_progress=False)
    monkeypatch.setattr(train_module, "save_run", original)
    assert not (out / "heft-2+1" / "seed-1" / "results.json").exists()
    finished = (out / "lora-20" / "seed-1" / "results.json").stat().st_mtime_ns

    summary = reproduce(str(path), show_progress=False)
    assert (out / "lora-20" / "seed-1" / "results.json").stat().st_mtime_ns == finished
    assert not summary["missing"] and list(summary["arms"]) == ["lora-20", "loreft-20", "heft-2+1", "joint-3"]
    assert read_metrics(out / "heft-2+1" / "seed-1") == [(-1, None), (0, 1), (0, 2), (1, 1)]
    assert [c["epoch"] for c in summary["arms"]["heft-2+1"]["curve"]] == [1, 2, 3]
    assert summary["arms"]["heft-2+1"]["optimizer_steps"] == 18


def test_branched_arm_equals_the_same_arm_trained_from_scratch(tmp_path, tiny_model_dir):
    path = tiny_reproduce_file(tmp_path, tiny_model_dir)
    only = ["arms_only=[lora-20,heft-2+1]"]
    summary = reproduce(str(path), only, show_progress=False)
    plan = load_plan(path, only)
    prefix = plan.prefixes["heft-2+1"]
    assert plan.prefixes["lora-20"] is prefix and prefix.stages == 1 and (prefix.run_dir(1) / "results.json").is_file()
    cfg = plan.configs["heft-2+1"][1]
    cfg.eval_zero_shot, cfg.output_dir = True, str(tmp_path / "scratch")  # as the prefix did
    scratch = run_training(cfg, tmp_path / "scratch", show_progress=False)
    branched = json.loads((out := plan.run_dir("heft-2+1", 1) / "results.json").read_text())
    for key in ("final_accuracy", "train_tokens", "eval_tokens", "optimizer_steps", "stages"):
        assert branched[key] == scratch[key], key

    def lines(run: Path) -> list[dict]:
        return [
            {k: v for k, v in json.loads(t).items() if k != "elapsed_s"}
            for t in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert lines(out.parent) == lines(tmp_path / "scratch")
    a, b = load_run(out.parent), load_run(tmp_path / "scratch")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    recorded = summary["arms"]["heft-2+1"]["branched_from"]["recorded"]["1"]
    assert recorded["run_dir"] == str(prefix.run_dir(1)) and recorded["checkpoint"] == checkpoint_hash(
        prefix.run_dir(1)
    )
    assert scratch["branched_from"] is None and branched["eval_set_hash"] == scratch["eval_set_hash"]


def test_branching_replaces_an_attempt_that_left_no_checkpoint(tmp_path):
    prefix, arm = tmp_path / "prefix", tmp_path / "arm"
    prefix.mkdir()
    for name in ("manifest.json", "metrics.jsonl", "results.json", "config.yaml"):
        (prefix / name).write_text(name)
    arm.mkdir()  # e.g. an `--only` run of this arm, stopped before its first epoch ended
    (arm / "config.yaml").write_text("stale")
    (arm / ".heft.lock").write_text("")
    reproduce_module.branch(prefix, arm)
    assert {p.name: p.read_text() for p in arm.iterdir()} == {
        "manifest.json": "manifest.json",
        "metrics.jsonl": "metrics.jsonl",
    }


def test_report_only_trains_nothing_and_names_what_is_missing(tmp_path, tiny_model_dir, monkeypatch):
    path = tiny_reproduce_file(tmp_path, tiny_model_dir)
    reproduce(str(path), ["arms_only=[loreft-20]"], show_progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("--report-only trained")

    monkeypatch.setattr(reproduce_module, "run_training", no_training)
    with run_folder_lock(tmp_path / "out-tiny"):  # as while another process trains into it
        summary = reproduce(str(path), show_progress=False, train=False)
        with pytest.raises(RunFolderBusy):  # training beside it is refused
            reproduce(str(path), show_progress=False)
    assert list(summary["arms"]) == ["loreft-20"]
    assert summary["missing"] == ["lora-20/seed-1", "heft-2+1/seed-1", "joint-3/seed-1"]
    assert "Not finished yet" in (tmp_path / "out-tiny" / "report.md").read_text()
    assert not list((tmp_path / "out-tiny").glob(".*.png.*")), "plots are written whole, no temporary left"


def test_a_folder_of_other_settings_is_not_reused(tmp_path, tiny_model_dir):
    path = tiny_reproduce_file(tmp_path, tiny_model_dir)
    reproduce(str(path), ["arms_only=[loreft-20]"], show_progress=False)
    with pytest.raises(ConfigError, match="different settings .*max_length"):
        reproduce(str(path), ["arms_only=[loreft-20]", "base.max_length=24"], show_progress=False)


def test_a_finished_run_is_reused_whatever_its_eval_every(tmp_path, tiny_model_dir, monkeypatch):
    path = tiny_reproduce_file(tmp_path, tiny_model_dir)
    first = reproduce(str(path), ["arms_only=[lora-20]", "eval_every=2"], show_progress=False)
    assert [c["epoch"] for c in first["arms"]["lora-20"]["curve"]] == [2]  # 2 epochs, evaluated after the 2nd only
    monkeypatch.setattr(reproduce_module, "run_training", lambda *a, **k: pytest.fail("trained again"))
    again = reproduce(str(path), ["arms_only=[lora-20]"], show_progress=False)  # eval_every: epoch
    assert again["arms"]["lora-20"] == first["arms"]["lora-20"], "when to evaluate does not change training"


@pytest.mark.parametrize(
    "evaluated, columns",
    [
        (list(range(1, 21)), [3, 5, 10, 20]),  # every epoch: the paper's HEFT budget, then milestones
        ([4, 8, 12, 16, 20], [4, 8, 12, 16, 20]),  # eval_every=4: what was evaluated
        ([1, 2], [1, 2]),
        (list(range(2, 21, 2)), [4, 8, 12, 16, 20]),  # ten evaluations thinned to at most six
        ([], []),
    ],
)
def test_longer_arms_table_shows_epochs_that_were_evaluated(evaluated, columns):
    assert milestones(evaluated) == columns


def test_seed_means_cover_the_epochs_every_seed_evaluated():
    def curve(*points):
        return [{"epoch": e, "accuracy": a, "train_tokens": 10 * e} for e, a in points]

    mean = _mean_curve([curve((1, 0.5), (2, 0.6), (4, 0.7)), curve((2, 0.4), (4, 0.9))])
    assert [(c["epoch"], c["accuracy"]["mean"]) for c in mean] == [(2, pytest.approx(0.5)), (4, pytest.approx(0.8))]


# ---------------------------------------------------------------------------- real model, smoke
@pytest.mark.slow
def test_smoke_preset_with_the_default_model(tmp_path, monkeypatch):
    assert SHARED_DATA.is_dir(), f"BoolQ expected at {SHARED_DATA}"
    monkeypatch.setenv("HEFT_DATA_DIR", str(SHARED_DATA.parent))
    start = time.perf_counter()
    summary = reproduce(str(CONFIG), ["preset=smoke"], output_dir=str(tmp_path), show_progress=False)
    wall = time.perf_counter() - start
    print(f"\nsmoke preset, all arms: {wall:.0f} s")
    assert list(summary["arms"]) == ARMS and not summary["missing"]
    for arm, epochs in SMOKE_EPOCHS.items():
        a = summary["arms"][arm]
        assert a["epochs"] == epochs and [c["epoch"] for c in a["curve"]] == list(range(1, sum(epochs) + 1))
        assert all(0 <= c["accuracy"]["mean"] <= 1 for c in a["curve"])
        assert a["train_tokens"] > 0 and a["optimizer_steps"] == 2 * sum(epochs)  # 16 examples, batch 8
    assert summary["data"]["train_examples"] == summary["data"]["eval_examples"] == 16
    assert summary["model"] == "smollm2-135m" and summary["zero_shot_accuracy"] is not None
    for name in ("accuracy_vs_epoch.png", "accuracy_vs_tokens.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    report = (tmp_path / "report.md").read_text()
    assert all(number in report for number in ("85.17", "85.05", "83.36"))

    start = time.perf_counter()
    again = reproduce(str(CONFIG), ["preset=smoke"], output_dir=str(tmp_path), show_progress=False)
    assert again == summary and time.perf_counter() - start < 30


def test_parallel_jobs_train_the_same_runs_as_one_process(tmp_path, tiny_model_dir):
    path = tiny_reproduce_file(tmp_path, tiny_model_dir)
    overrides = ["seeds=[1,2]", "arms_only=[lora-20,heft-2+1,loreft-20]"]
    plan = load_plan(path, overrides)
    # lora-20 (2 epochs here) and heft-2+1 share their first stage: one job per seed trains both
    assert sorted((seed, sorted(arms)) for seed, arms in plan_jobs(plan)) == [
        (1, ["heft-2+1", "lora-20"]),
        (1, ["loreft-20"]),
        (2, ["heft-2+1", "lora-20"]),
        (2, ["loreft-20"]),
    ]
    sequential = reproduce(str(path), overrides, output_dir=str(tmp_path / "one"), show_progress=False)
    parallel = reproduce(str(path), overrides, output_dir=str(tmp_path / "two"), show_progress=False, jobs=2)
    assert not parallel["missing"] and parallel["arms"].keys() == sequential["arms"].keys()
    for arm, summary in sequential["arms"].items():
        for seed, run in summary["seeds"].items():
            other = parallel["arms"][arm]["seeds"][seed]
            for key in ("final_accuracy", "final_correct", "train_tokens", "optimizer_steps", "zero_shot_accuracy"):
                assert other[key] == run[key], (arm, seed, key)
    assert (tmp_path / "two" / "_prefix").is_dir() and (tmp_path / "two" / "report.md").is_file()


def test_a_folder_saved_with_the_default_eval_split_by_name_is_the_same_config(tmp_path):
    """Run folders written when a config's unset eval split was filled in by name (`validation` for
    BoolQ) are the same settings as today's `data.eval_split: null`, which the task resolves."""
    from heft.config import config_from_dict, config_to_dict

    cfg = config_from_dict({"data": {"source": str(write_toy_boolq(tmp_path / "data"))}})
    saved = config_to_dict(cfg)
    saved["data"]["eval_split"] = "validation"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    reproduce_module._check_same_config(tmp_path / "run", cfg)
    saved["data"]["eval_split"], saved["max_eval_examples"] = "train", 8
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"different settings \(data, max_eval_examples\)"):
        reproduce_module._check_same_config(tmp_path / "run", cfg)
