"""The lm-evaluation-harness bridge: lm-eval's requests scored with heft's interventions where heft puts
them, the shipped offline tasks rendering heft's own prompts, and `heft eval --lm-eval` agreeing with
`heft eval` document by document."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from conftest import make_heft, make_model, make_tokenizer
from heft.cli import main
from heft.config import DataConfig
from heft.lm_eval_bridge import HeftLM, find_tasks, shipped_task_config, shipped_tasks
from heft.models import LoadedModel
from heft.pipeline import HeftModel
from heft.tasks import DataError, get_task
from test_multiple_choice import REPO, SHARED, by_hand, ids, staged, write_toy_mc
from test_train import toy_config

PROGRESS_BAR = re.compile(r"^[\w ]*:? *\d+%\|")
"""A tqdm line, the only thing `heft eval` prints to stderr besides errors."""
CONTEXTS = ["Question : is the cat red ?\nAnswer :", "the dog is green and the cat is blue", "one"]
CONTINUATIONS = [" yes", " no the cat is blue", " red cat", " two three four"]


def requests(*args_list) -> list[SimpleNamespace]:
    """lm-eval `Instance`s as the model interface reads them (`.args` only)."""
    return [SimpleNamespace(args=args) for args in args_list]


def word_model(arch: str = "llama") -> HeftModel:
    """A tiny model whose vocabulary is the tokenizer's, so that everything it generates is a word."""
    tokenizer = make_tokenizer()
    return HeftModel(LoadedModel(make_model(arch, vocab_size=len(tokenizer)), tokenizer, "tiny", "0" * 64, []))


def greedy_by_hand(model: HeftModel, prompt: list[int], continuation: list[int]) -> bool:
    sequence = torch.tensor([prompt + continuation])
    prompt_mask = torch.arange(sequence.shape[1]).unsqueeze(0) < len(prompt)
    logits = model.lm_head(model(sequence, prompt_mask=prompt_mask).hidden_states[0])
    return all(int(logits[len(prompt) - 1 + j].argmax()) == t for j, t in enumerate(continuation))


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_loglikelihood_edits_the_context_only(heft_model: HeftModel, batch_size: int) -> None:
    """Every (context, continuation) scores as one unpadded forward with the stages editing the context
    tokens, whatever the batch; is_greedy is whether each continuation token is the argmax."""
    model = staged(heft_model)
    pairs = [(c, t) for c in CONTEXTS for t in CONTINUATIONS]
    got = HeftLM(model, batch_size=batch_size, progress=False).loglikelihood(requests(*pairs))
    for (context, continuation), (loglik, greedy) in zip(pairs, got, strict=True):
        prompt = model.tokenizer(context)["input_ids"]
        tokens = ids(model, continuation)
        assert loglik == pytest.approx(by_hand(model, prompt, tokens), abs=1e-4)
        assert greedy == greedy_by_hand(model, prompt, tokens)
    model.reft[0].detach()  # the edits must matter for this test to mean anything
    without = HeftLM(model, progress=False).loglikelihood(requests(*pairs))
    assert max(abs(a[0] - b[0]) for a, b in zip(got, without)) > 1e-2


def test_the_greedy_continuation_is_flagged_greedy() -> None:
    """A continuation of the argmax tokens is flagged greedy (the model's vocabulary is the tokenizer's,
    so every argmax is a word)."""
    model = word_model()
    lm = HeftLM(model, progress=False)
    context = CONTEXTS[1]
    greedy = lm.generate_until(requests((context, {"until": [], "max_gen_toks": 2})))[0]
    assert len(ids(model, greedy)) == 2
    (loglik, flagged), (_, other) = lm.loglikelihood(requests((context, greedy), (context, " zebra")))
    assert flagged and not other
    assert loglik == pytest.approx(by_hand(model, model.tokenizer(context)["input_ids"], ids(model, greedy)), abs=1e-5)


def test_trailing_context_space_moves_to_the_continuation() -> None:
    lm = HeftLM(make_heft(), progress=False)
    assert lm._encode_pair("Answer : ", "yes") == lm._encode_pair("Answer :", " yes")


def test_rolling_loglikelihood_scores_every_token_once_in_windows(heft_model: HeftModel) -> None:
    """A text longer than the model's 128 positions is scored in lm-eval's windows; each window's
    context is the edited prompt, and the windows' totals add up per text."""
    model = staged(heft_model)
    long_text = " ".join(["the cat is red and the dog is blue"] * 30)
    lm = HeftLM(model, batch_size=3, progress=False)
    got = lm.loglikelihood_rolling(requests((long_text,), ("one two three",)))
    for text, total in zip([long_text, "one two three"], got):
        tokens = ids(model, text)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.prefix_token_id, 128, 1)]
        assert sum(len(cont) for _, cont in windows) == len(tokens)
        assert total == pytest.approx(sum(by_hand(model, ctx, cont) for ctx, cont in windows), abs=1e-3)
    assert len(ids(model, long_text)) > 2 * lm.max_length


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_until_matches_heft_generate_and_cuts_at_stop_strings(arch: str) -> None:
    """Batched, left-padded generation with the prompt edited equals one prompt at a time through
    `HeftModel.generate`; the text ends before the first stop string."""
    model = staged(word_model(arch))
    lm = HeftLM(model, batch_size=4, progress=False)

    def alone(context: str, n: int) -> str:
        prompt = torch.tensor([model.tokenizer(context)["input_ids"]])
        out = model.generate(prompt, torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
        return model.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)

    free = lm.generate_until(requests(*[(c, {"until": [], "max_gen_toks": 6}) for c in CONTEXTS]))
    assert free == [alone(c, 6) for c in CONTEXTS] and all(free)
    stop = free[0].split()[2]  # a word the first answer reaches after two others
    cut = lm.generate_until(requests((CONTEXTS[0], {"until": [stop], "max_gen_toks": 6, "temperature": 0})))
    assert cut == [free[0][: free[0].index(stop)]]


# --- the shipped tasks ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa", "boolq"])
def test_shipped_tasks_render_heft_prompts_from_local_files(name: str, monkeypatch) -> None:
    """lm-eval's view of the shipped task equals heft's own examples: prompt, choices (after lm-eval's
    target delimiter) and gold index, row for row, read from $HEFT_DATA_DIR without the hub."""
    monkeypatch.setenv("HEFT_DATA_DIR", str(SHARED))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = find_tasks([name])
    task = tasks.manager.load(tasks.specs)["tasks"][name]
    split = "validation" if name == "boolq" else "test"
    docs = list(task.eval_docs)[:6]
    heft_task = get_task(name)
    examples = heft_task.load_split(DataConfig(), split)[:6]
    for doc, example in zip(docs, examples, strict=True):
        assert task.doc_to_text(doc) == example.prompt
        assert [task.config.target_delimiter + c for c in task.doc_to_choice(doc)] == example.choices
        assert task.doc_to_target(doc) == example.label
    assert len(task.eval_docs) == len(heft_task.load_split(DataConfig(), split))


def test_shipped_task_data_paths_follow_heft_data_dir(tmp_path, monkeypatch) -> None:
    assert sorted(shipped_tasks()) == ["arc_challenge", "arc_easy", "boolq", "openbookqa"]
    monkeypatch.setenv("HEFT_DATA_DIR", str(tmp_path))
    path = shipped_tasks()["arc_easy"]
    with pytest.raises(DataError, match=rf"{path.name}: dataset_kwargs.data_files.train: no file {tmp_path}"):
        shipped_task_config(path)
    write_toy_mc(tmp_path / "arc_easy")
    files = shipped_task_config(path)["dataset_kwargs"]["data_files"]
    assert files == {split: str(tmp_path / "arc_easy" / f"{split}.parquet") for split in ("train", "test")}


def test_an_include_folder_takes_precedence_and_unknown_names_are_one_line(tmp_path, monkeypatch) -> None:
    """A task of the same name in an include folder wins over the shipped one; an unknown name is an
    error that suggests the closest task."""
    monkeypatch.setenv("HEFT_DATA_DIR", str(SHARED))
    mine = yaml.safe_load(shipped_tasks()["arc_easy"].read_text())
    mine["doc_to_text"] = "Q: {{question}}\nA:"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    specs = find_tasks(["arc_easy", "boolq"], [tmp_path]).specs
    assert specs[0] == "arc_easy" and specs[1]["task"] == "boolq"
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'arc_eazy'; did you mean 'arc_easy'\?"):
        find_tasks(["arc_eazy"], [tmp_path])
    with pytest.raises(FileNotFoundError, match="--lm-eval-include"):
        find_tasks(["arc_easy"], [tmp_path / "missing"])
    assert TaskManager(include_path=str(tmp_path), include_defaults=False).all_tasks == ["arc_easy"]


# --- the command line ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_arc(tmp_path_factory) -> tuple[Path, Path]:
    """A LoRA + LoReFT run on ARC-layout toy data, and the data folder it read (`$HEFT_DATA_DIR`, where
    lm-eval's arc_easy task reads too); trained once for the tests below."""
    root = tmp_path_factory.mktemp("toy-arc")
    model_dir = root / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = root / "data"
    write_toy_mc(data / "arc_easy", n_train=24, n_test=30)
    config = toy_config(model_dir, data, root / "unused", task="arc_easy", data={}, eval_batch_size=4)
    config["stages"][1]["reft"] = {"rank": 2, "positions": "f2+l2", "init": "random"}
    path = root / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    run = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEFT_DATA_DIR", str(data))
        argv = ["train", str(path), "stages.0.epochs=1", "stages.1.epochs=1", "--output-dir", str(run), "-q"]
        assert main(argv) == 0
    return run, data


@pytest.fixture
def toy_arc_run(toy_arc, monkeypatch) -> Iterator[Path]:
    """The toy run, with `$HEFT_DATA_DIR` at its data; the lm-eval files a test writes are removed after it."""
    run, data = toy_arc
    monkeypatch.setenv("HEFT_DATA_DIR", str(data))
    yield run
    for path in run.glob("lm-eval-*"):
        path.unlink()


def lm_eval_files(run: Path) -> tuple[dict, list[dict]]:
    """The newest lm-eval results and samples in a run folder (and no more than one of each)."""
    (results,) = sorted(run.glob("lm-eval-*[0-9].json"))
    (samples,) = sorted(run.glob("lm-eval-*-samples.jsonl"))
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]


@pytest.mark.parametrize("zero_shot", [False, True])
def test_lm_eval_agrees_with_heft_eval_question_by_question(toy_arc_run, capsys, zero_shot) -> None:
    """`heft eval RUN --lm-eval arc_easy` gives `heft eval RUN`'s acc and acc_norm, and the same right
    and wrong answers, for the trained run and for its zero-shot base; the table is printed, the
    results JSON, samples and lm-eval's log land in the run folder, and nothing else is printed."""
    flags = ["--zero-shot"] if zero_shot else []
    capsys.readouterr()
    assert main(["eval", str(toy_arc_run), *flags]) == 0
    heft = json.loads(capsys.readouterr().out)
    assert main(["eval", str(toy_arc_run), "--lm-eval", "arc_easy", *flags]) == 0
    captured = capsys.readouterr()
    results, samples = lm_eval_files(toy_arc_run)
    scores = results["results"]["arc_easy"]
    assert (scores["acc,none"], scores["acc_norm,none"]) == (heft["acc"], heft["acc_norm"])
    assert "".join(str(int(s["acc_norm"])) for s in sorted(samples, key=lambda s: s["doc_id"])) == heft["correct"]
    assert results["config"]["heft_stages"] == ([] if zero_shot else ["0-lora", "1-loreft"])
    assert "|arc_easy|" in captured.out and "acc_norm" in captured.out
    assert not [line for line in re.split(r"[\r\n]", captured.err) if line.strip() and not PROGRESS_BAR.match(line)]
    assert "WARNING" not in captured.out
    assert any(p.suffix == ".log" and p.stat().st_size for p in toy_arc_run.glob("lm-eval-*"))


def test_zero_shot_evaluation_scores_the_base_model(toy_arc_run, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", str(toy_arc_run), "--zero-shot"]) == 0
    zero = json.loads(capsys.readouterr().out)
    first = json.loads((toy_arc_run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["stage"] == "zero-shot" and zero["zero_shot"] and zero["accuracy"] == first["eval_accuracy"]


def test_missing_task_data_fails_before_the_model_loads(toy_arc_run, capsys, monkeypatch) -> None:
    """The toy data folder has no boolq/: one line naming the task YAML, field and file, and a hint."""
    monkeypatch.setattr("heft.io.load_run", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["eval", str(toy_arc_run), "--lm-eval", "arc_easy,boolq"]) == 2
    error, hint = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: ") and "boolq.yaml: dataset_kwargs.data_files.train: no file" in error
    assert hint.startswith("hint: set HEFT_DATA_DIR to the folder that holds boolq/")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--split", "train"], "--lm-eval runs its tasks' own splits and scoring; drop ['--split']"),
        (["--mode", "generate"], "drop ['--mode generate']"),
        (["--lm-eval-limit", "0"], "--lm-eval-limit must be at least 1"),
    ],
)
def test_lm_eval_flags_that_do_not_fit_are_one_line_errors(tmp_path, capsys, flags, message) -> None:
    assert main(["eval", str(tmp_path), "--lm-eval", "arc_easy", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_lm_eval_agrees_with_heft_eval_on_smollm2(tmp_path) -> None:
    """The default model, zero-shot, on the first 40 ARC-Easy test questions: `heft eval --lm-eval` and
    `heft eval` pick the same answers (the full-split record is docs/results/lm-eval/README.md)."""
    data = tmp_path / "data" / "arc_easy"
    data.mkdir(parents=True)
    for split in ("train", "test"):
        pd.read_parquet(SHARED / "arc_easy" / f"{split}.parquet").head(40).to_parquet(data / f"{split}.parquet")
    env = {**os.environ, "HEFT_DATA_DIR": str(data.parent)}
    run = tmp_path / "run"

    def heft(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "heft", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    common = ["max_train_examples=8", "max_eval_examples=8", "stages.0.epochs=1", "stages.1.epochs=1", "-q"]
    heft("train", "configs/arc_easy_heft.yaml", *common, "--output-dir", str(run))
    for flags in ([], ["--zero-shot"]):
        ours = json.loads(heft("eval", str(run), "--max-examples", "40", *flags))
        heft("eval", str(run), "--lm-eval", "arc_easy", *flags)
        results, samples = lm_eval_files(run)
        assert results["results"]["arc_easy"]["acc_norm,none"] == ours["acc_norm"] and ours["n"] == 40
        assert "".join(str(int(s["acc_norm"])) for s in sorted(samples, key=lambda s: s["doc_id"])) == ours["correct"]
        for path in run.glob("lm-eval-*"):
            path.unlink()
