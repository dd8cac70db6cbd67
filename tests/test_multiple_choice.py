"""Multiple-choice tasks: continuation scoring against a direct computation, acc/acc_norm, data
errors that name file, row and field, the registry, and train → eval → predict from the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import heft.tasks.base
from conftest import WORDS, make_heft
from heft.cli import main
from heft.config import DataConfig, config_from_dict, load_config
from heft.evaluate import continuation_logprobs, evaluate, predict
from heft.pipeline import HeftModel
from heft.tasks import DataError, EncodedExample, MultipleChoiceTask, get_task, list_tasks

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
TASKS = {"arc_easy": (2251, 2376), "arc_challenge": (1119, 1172), "openbookqa": (4957, 500)}


def ids(model: HeftModel, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def staged(model: HeftModel) -> HeftModel:
    """An unmerged LoRA stage and a ReFT stage, both far from the identity, so a wrong edit shows."""

    def stage(spec: dict):
        return config_from_dict({"stages": [spec]}).stages[0]

    model.add_stage(stage({"method": "lora", "lora": {"r": 2, "merge": False}}), seed=1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.finish_stage()
    model.add_stage(stage({"method": "loreft", "reft": {"rank": 2, "positions": "f1+l2", "init": "random"}}), seed=2)
    for p in model.reft.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.finish_stage()
    return model.eval()


def by_hand(model: HeftModel, prompt: list[int], continuation: list[int]) -> float:
    """Sum of per-token log-probs of `continuation` from one unpadded forward over prompt + continuation,
    with the interventions on the prompt tokens as in training."""
    sequence = torch.tensor([prompt + continuation])
    prompt_mask = torch.arange(sequence.shape[1]).unsqueeze(0) < len(prompt)
    hidden = model(sequence, prompt_mask=prompt_mask).hidden_states[0]
    logprobs = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + j, token]) for j, token in enumerate(continuation))


QUESTIONS = [  # prompts of different lengths; continuations of 1 to 4 tokens, 2 to 4 per question
    ("Question : is the cat red ?\nAnswer :", [" yes", " no the cat is blue", " red cat"]),
    ("Question : one ?\nAnswer :", [" two three", " four"]),
    (
        "Question : the dog is green and the cat is blue and a passage is red ?\nAnswer :",
        [" a", " the dog", " one two three four", " five"],
    ),
]


@pytest.mark.parametrize("side", ["right", "left"])
def test_continuation_loglik_equals_sum_of_token_logprobs(heft_model: HeftModel, side: str) -> None:
    """Plain model: each choice's score is the sum of its tokens' log-probs under HF's own logits."""
    prompts = [ids(heft_model, p) for p, _ in QUESTIONS]
    continuations = [[ids(heft_model, c) for c in choices] for _, choices in QUESTIONS]
    got = continuation_logprobs(heft_model, prompts, continuations, padding_side=side)
    for prompt, conts, scores in zip(prompts, continuations, got):
        for cont, score in zip(conts, scores):
            logits = heft_model.model(torch.tensor([prompt + cont])).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            expected = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
            assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_reuse_with_stages_equals_training_computation(heft_model: HeftModel, side: str) -> None:
    """With LoRA and ReFT stages the reused prompt keys/values carry the prompt edits, and the
    continuation tokens stay unedited: the scores equal a full forward as training runs it."""
    model = staged(heft_model)
    prompts = [ids(model, p) for p, _ in QUESTIONS]
    continuations = [[ids(model, c) for c in choices] for _, choices in QUESTIONS]
    got = continuation_logprobs(model, prompts, continuations, padding_side=side)
    expected = [[by_hand(model, p, c) for c in conts] for p, conts in zip(prompts, continuations)]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)
    model.reft[0].detach()  # the interventions must have mattered for this test to mean anything
    without = continuation_logprobs(model, prompts, continuations, padding_side=side)
    assert max(abs(a - b) for g, w in zip(got, without) for a, b in zip(g, w)) > 1e-2


def test_single_token_choices_need_no_second_pass(heft_model: HeftModel) -> None:
    prompt = ids(heft_model, "Question : is it red ?\nAnswer :")
    choices = [ids(heft_model, " yes"), ids(heft_model, " no")]
    got = continuation_logprobs(heft_model, [prompt], [choices])[0]
    logprobs = heft_model.next_token_logprobs(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))[0]
    assert got == pytest.approx([float(logprobs[c[0]]) for c in choices], abs=1e-5)


def test_acc_and_acc_norm_follow_lm_eval(heft_model: HeftModel) -> None:
    """acc is the argmax of the summed log-probs, acc_norm of that divided by the choice's characters
    (without the leading space); `accuracy` and `correct` follow the headline (acc_norm)."""
    task = get_task("arc_easy")
    rows = [
        {
            "question": q.removeprefix("Question : ").split("\n")[0],
            "choices": [c.strip() for c in cs],
            "label": i % len(cs),
        }
        for i, (q, cs) in enumerate(QUESTIONS)
    ]
    examples = [task.to_example(r) for r in rows]
    encoded, _ = task.encode(examples, heft_model.tokenizer, 64)
    assert [e.choice_chars for e in encoded] == [[len(c) for c in r["choices"]] for r in rows]
    result = evaluate(heft_model, task, encoded, batch_size=2, progress=False)
    lls = continuation_logprobs(
        heft_model, [e.input_ids[: e.prompt_len] for e in encoded], [e.choice_ids for e in encoded]
    )
    by_sum = [max(range(len(s)), key=s.__getitem__) for s in lls]
    by_norm = [max(range(len(s)), key=lambda j: s[j] / e.choice_chars[j]) for s, e in zip(lls, encoded)]
    assert by_sum != by_norm  # the two metrics pick differently somewhere, so swapping them would show
    acc = [j == e.label for j, e in zip(by_sum, encoded)]
    norm = [j == e.label for j, e in zip(by_norm, encoded)]
    assert result["acc"] == sum(acc) / 3 and result["acc_norm"] == sum(norm) / 3
    assert result["headline"] == "acc_norm" and result["accuracy"] == result["acc_norm"]
    assert result["correct"] == "".join("1" if c else "0" for c in norm) and result["n"] == 3
    assert {"majority_accuracy", "per_class_accuracy", "mean_margin"} <= result.keys()
    for p, j_sum, j_norm in zip(predict(heft_model, task, encoded, progress=False), by_sum, by_norm, strict=True):
        assert sum(p.probs) == pytest.approx(1) and p.predicted == p.predicted_by["acc_norm"] == j_norm
        assert p.predicted_by["acc"] == j_sum


def test_encode_targets_gold_continuation_and_refuses_too_long(tokenizer) -> None:
    task = get_task("openbookqa")
    example = task.to_example({"question": "is the cat red", "choices": ["yes", "no the dog is"], "label": 1})
    assert (example.prompt, example.target) == ("Question: is the cat red\nAnswer:", " no the dog is")
    [enc], _ = task.encode([example], tokenizer, 32)
    assert (
        enc.input_ids[enc.prompt_len :]
        == enc.choice_ids[1]
        == tokenizer(" no the dog is", add_special_tokens=False)["input_ids"]
    )
    prompt_len = len(tokenizer(example.prompt)["input_ids"])
    task.encode([example], tokenizer, prompt_len + 4)  # the longest choice (4 tokens) just fits
    with pytest.raises(ValueError, match=r"example 0 .*longest choice.*raise max_length"):
        task.encode([example], tokenizer, prompt_len + 3)


# --- data: sources, columns, errors ------------------------------------------------------------


def test_registry_and_real_data() -> None:
    assert {"boolq", *TASKS} <= set(list_tasks())
    for name, sizes in TASKS.items():
        task = get_task(name)
        assert isinstance(task, MultipleChoiceTask) and task.default_eval_split == "test"
        cfg = DataConfig(source=str(SHARED / name))
        splits = [task.load_split(cfg, split) for split in ("train", "test")]
        assert tuple(map(len, splits)) == sizes
        assert all(3 <= len(e.choices) <= 5 and e.target == e.choices[e.label] for s in splits for e in s)
    first = get_task("arc_easy").load_split(DataConfig(source=str(SHARED / "arc_easy")), "test")[0]
    assert first.prompt.startswith(
        "Question: Which statement best explains why photosynthesis"
    ) and first.prompt.endswith("\nAnswer:")
    assert first.target == " Sunlight is the source of energy for nearly all ecosystems."
    for name, split in [("arc_challenge", "test"), ("boolq", "validation")]:  # null: the task's default
        cfg = config_from_dict({"task": name})
        assert cfg.data.eval_split is None and get_task(name).eval_split(cfg.data) == split


def test_heft_data_dir_columns_and_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = pd.DataFrame({"stem": ["q one", "q two"], "options": [["a", "b"], ["c", "d", "e"]], "answer": [1, 2]})
    (tmp_path / "arc_easy").mkdir()
    rows.to_parquet(tmp_path / "arc_easy" / "test.parquet")
    monkeypatch.setenv("HEFT_DATA_DIR", str(tmp_path))
    columns = {"question": "stem", "choices": "options", "label": "answer"}
    got = get_task("arc_easy").load_split(DataConfig(columns=columns), "test")
    assert [(e.prompt, e.choices, e.label) for e in got] == [
        ("Question: q one\nAnswer:", [" a", " b"], 1),
        ("Question: q two\nAnswer:", [" c", " d", " e"], 2),
    ]
    assert get_task("arc_easy").describe_source(DataConfig()) == str((tmp_path / "arc_easy").resolve())
    csv = tmp_path / "test.csv"  # CSV holds the list as JSON text, the label as digits
    rows.assign(options=rows["options"].map(lambda c: json.dumps(list(c)))).to_csv(csv, index=False)
    assert [
        e.choices for e in get_task("arc_easy").load_split(DataConfig(source=str(csv), columns=columns), "test")
    ] == [e.choices for e in got]


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        ({"choices": ["a", "b", "c"], "label": 3}, "label", "outside the 3 choices (0..2)"),
        ({"choices": ["a", "b"], "label": -1}, "label", "outside"),
        ({"choices": ["a", "b"], "label": "b"}, "label", "integer index"),
        ({"choices": ["a", "b"], "label": True}, "label", "integer index"),
        ({"choices": [], "label": 0}, "choices", "empty choice list"),
        ({"choices": ["a"], "label": 0}, "choices", "one choice ('a'); a question needs at least two"),
        ({"choices": ["a", "b"], "label": "²"}, "label", "integer index"),  # a digit to str.isdigit, not to int()
        ({"choices": "a, b", "label": 0}, "choices", "expected a list of strings, got str"),
        ({"choices": ["a", 7], "label": 0}, "choices", "choice 1 is int"),
        ({"choices": ["a", " "], "label": 0}, "choices", "choice 1 is empty"),
        ({"question": 12, "choices": ["a", "b"], "label": 0}, "question", "expected text, got int"),
        ({"choices": {"text": ["a", "b"], "label": ["A", "B"]}, "label": "E"}, "label", "none of the choice labels"),
        ({"choices": {"text": ["a", "b"], "label": ["A"]}, "label": "A"}, "choices", "of equal lengths"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path: Path, row: dict, field: str, words: str) -> None:
    good = {"question": "is it", "choices": ["a", "b"], "label": 0}
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, good, {**good, **row}]), encoding="utf-8")
    with pytest.raises(DataError) as info:
        get_task("openbookqa").load_split(DataConfig(source=str(path)), "test")
    message = str(info.value)
    assert message.startswith(f"{path}: line 3: field '{field}'") and words in message, message


HUB_ARC = [  # allenai/ai2_arc's layout: choices {text, label}, the answer a key (letters or digits)
    {"question": "Which is a liquid?", "choices": {"text": ["ice", "water", "steam"], "label": ["A", "B", "C"]}},
    {"question": "Legs of a spider?", "choices": {"text": ["6", "8", "10", "4"], "label": ["1", "2", "3", "4"]}},
]
HUB_ANSWERS = ["B", "2"]


def fake_hub(calls: list) -> object:
    """`datasets.load_dataset` serving HUB_ARC in allenai's layouts (openbookqa: `question_stem`)."""
    import datasets

    def load(source: str, name: str | None, split: str) -> datasets.Dataset:
        calls.append((source, name, split))
        rows = [{**row, "answerKey": key} for row, key in zip(HUB_ARC, HUB_ANSWERS)]
        if source == "allenai/openbookqa":
            rows = [{"question_stem": row.pop("question"), **row} for row in rows]
        return datasets.Dataset.from_list(rows)

    return load


def test_presets_read_their_hub_originals_without_the_shared_folder(tmp_path: Path, monkeypatch, caplog) -> None:
    """Where ../shared/data is absent (a user's machine), arc_* and openbookqa read allenai's hub datasets,
    whose choices are {text, label} and whose answer is a key; data.subset and data.columns still override."""
    import datasets

    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", fake_hub(calls))
    monkeypatch.setattr(heft.tasks.base, "_ANNOUNCED_HUB_COPIES", set())  # earlier tests may have announced
    monkeypatch.delenv("HEFT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    expected = [
        ("Question: Which is a liquid?\nAnswer:", [" ice", " water", " steam"], 1),
        ("Question: Legs of a spider?\nAnswer:", [" 6", " 8", " 10", " 4"], 1),
    ]
    for name, hub in [
        ("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge")),
        ("openbookqa", ("allenai/openbookqa", "main")),
    ]:
        task, calls[:] = get_task(name), []
        assert task.eval_split(DataConfig()) == "test"
        with caplog.at_level("WARNING", logger="heft"):
            got = task.load_split(DataConfig(), "test")
        assert calls == [(*hub, "test")] and [(e.prompt, e.choices, e.label) for e in got] == expected
        assert task.describe_source(DataConfig()) == f"hub:{hub[0]} ({hub[1]})"
        assert f"no ../shared/data/{name} from here" in caplog.text
    calls[:] = []
    get_task("arc_easy").load_split(DataConfig(subset="ARC-Challenge"), "train")
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "train")]
    with pytest.raises(
        DataError, match=r"shared/data/arc_easy does not exist .*allenai/ai2_arc \(ARC-Easy\) \[test\].*'stem'"
    ):
        get_task("arc_easy").load_split(DataConfig(columns={"question": "stem"}), "test")
    with pytest.raises(DataError, match="does not exist"):  # a source written out is read, or refused
        get_task("arc_easy").load_split(DataConfig(source="../shared/data/arc_easy"), "test")
    if SHARED.is_dir():
        monkeypatch.chdir(REPO)  # the shared copy, where it exists
        assert get_task("arc_easy").describe_source(DataConfig()) == str((SHARED / "arc_easy").resolve())


def test_hub_layout_with_a_subset_and_numbers_as_indices(tmp_path: Path, monkeypatch) -> None:
    """The guide's example (`task: multiple_choice` on allenai/ai2_arc); in that layout an answer given as
    a number is an index, as in the list layout, and a row to predict may lack it. A subset needs a hub id."""
    import datasets

    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", fake_hub(calls))
    data = DataConfig(source="allenai/ai2_arc", subset="ARC-Challenge", columns={"label": "answerKey"})
    got = get_task("multiple_choice").load_split(data, "test")
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "test")] and [e.label for e in got] == [1, 1]
    task = get_task("arc_easy")
    indexed = task.to_example({**HUB_ARC[1], "label": 3})
    assert indexed.label == 3 and indexed.target == " 4"  # the index 3, not key "3"
    assert task.to_query(HUB_ARC[1]).label == -1
    (tmp_path / "test.jsonl").write_text(json.dumps({**HUB_ARC[0], "label": "B"}) + "\n")
    with pytest.raises(DataError, match="is a configuration of a hub dataset|names a configuration"):
        task.load_split(DataConfig(source=str(tmp_path), subset="ARC-Easy"), "test")


def test_wrong_parquet_column_type(tmp_path: Path) -> None:
    pd.DataFrame({"question": ["q"], "choices": ["a|b"], "label": [0]}).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet: row 1: field 'choices': expected a list of strings"):
        get_task("arc_challenge").load_split(DataConfig(source=str(tmp_path)), "train")


def test_new_dataset_is_a_mapping() -> None:
    riddles = get_task({"kind": "multiple_choice", "name": "riddles", "template": "Riddle: {question}\nAnswer:"})
    example = riddles.to_example({"question": "what is red", "choices": ["a cat", "a dog"], "label": 0})
    assert (example.prompt, example.choices) == ("Riddle: what is red\nAnswer:", [" a cat", " a dog"])
    assert riddles.name == "riddles" and type(riddles) is type(get_task("arc_easy")) is MultipleChoiceTask
    assert EncodedExample([1], 1, 0, False).choice_ids == []


# --- the command line: train, eval, predict ----------------------------------------------------


def write_toy_mc(folder: Path, n_train: int = 24, n_test: int = 12) -> Path:
    """ARC-layout parquet files (2 or 3 choices, one of two words) with a learnable gold position."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in [("train", n_train), ("test", n_test)]:
        rows = []
        for i in range(n):
            words = [WORDS[int(j)] for j in torch.randperm(len(WORDS) - 4, generator=g)[:6] + 4]
            choices = [words[3], f"{words[4]} {words[5]}", words[2]][: 2 + i % 2]
            rows.append(
                {"question": " ".join(words[:3]), "choices": choices, "label": len(choices) - 1 if i % 2 else 0}
            )
        pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet")
    return folder


def test_train_eval_predict_from_the_command_line(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    shipped = load_config(REPO / "configs" / "arc_easy_heft.yaml")
    assert (shipped.task, get_task(shipped.task).eval_split(shipped.data), [s.method for s in shipped.stages]) == (
        "arc_easy",
        "test",
        ["lora", "loreft"],
    )
    data = write_toy_mc(tmp_path / "data")
    config = tmp_path / "toy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "task": "openbookqa",
                "data": {"source": str(data)},
                "max_length": 32,
                "batch_size": 8,
                "eval_batch_size": 4,
                "stages": [
                    {"method": "lora", "epochs": 1, "lr": 2e-2, "lora": {"r": 4, "dropout": 0.0}},
                    {"method": "loreft", "epochs": 1, "lr": 2e-2, "reft": {"rank": 2, "positions": "f1+l1"}},
                ],
            }
        )
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run), "-q"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["data"]["eval_split"] == "test" and results["data"]["eval_examples"] == 12
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "test" and out["headline"] == "acc_norm" and out["accuracy"] == results["final_accuracy"]
    assert 0 <= out["acc"] <= 1 and len(out["correct"]) == out["n"] == 12

    assert main(["predict", str(run), "--question", "is the cat red", "--choices", "yes", "no the dog"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["prediction"] in {"yes", "no the dog"} and 0.5 <= answer["probability"] <= 1
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        '{"question": "a cat", "choices": ["red", "blue", "one two"]}\n'
        '{"question": "b", "choices": ["x", "y"], "label": 1}\n'
    )
    assert main(["predict", str(run), "--input", str(queries), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["prediction"] in {"red", "blue", "one two"} and rows[1]["prediction"] in {"x", "y"}
    assert not math.isnan(rows[0]["probability"])

    assert main(["predict", str(run), "--question", "no choices"]) == 2
    assert "lacks ['choices']" in capsys.readouterr().err
    assert main(["predict", str(run), "--question", "one choice", "--choices", "yes"]) == 2
    assert "at least two" in capsys.readouterr().err
    good = '{"question": "a cat", "choices": ["red", "blue"]}\n'
    for bad, message in [
        ("{bad\n", "line 3: invalid JSON"),
        ('{"question": "q", "choices": "red"}\n', "line 3: field 'choices': expected a list"),
        ('{"choices": ["a", "b"]}\n', "line 3: field 'question': a row to predict lacks ['question']"),
        ("[1, 2]\n", "line 3: expected a JSON object"),
    ]:
        queries.write_text(good + "\n" + bad)
        assert main(["predict", str(run), "--input", str(queries)]) == 2
        assert f"{queries}: {message}" in " ".join(capsys.readouterr().err.split()), bad
    assert main(["eval", str(run), "--mode", "generate"]) == 2
    assert "--mode score" in capsys.readouterr().err


def test_a_folder_of_my_own_questions_trains_with_task_multiple_choice(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    """Only train.jsonl and test.jsonl, other column names, no benchmark's name and no eval_split:
    `task: multiple_choice` and `data.columns` are enough, and the folder's test split is evaluated."""
    toy = write_toy_mc(tmp_path / "toy", n_train=16, n_test=6)
    data = tmp_path / "mine"
    data.mkdir()
    for split in ("train", "test"):
        frame = pd.read_parquet(toy / f"{split}.parquet")
        rows = frame.rename(columns={"question": "stem", "choices": "options", "label": "answer_idx"})
        rows.to_json(data / f"{split}.jsonl", orient="records", lines=True)
    config = tmp_path / "mine.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "task": "multiple_choice",
                "data": {
                    "source": str(data),
                    "columns": {"question": "stem", "choices": "options", "label": "answer_idx"},
                },
                "max_length": 32,
                "eval_zero_shot": False,
                "output_dir": str(tmp_path / "runs" / "{task}"),
                "stages": [{"method": "lora", "epochs": 1, "lr": 1e-2, "lora": {"r": 2}}],
            }
        )
    )
    assert main(["train", str(config), "-q"]) == 0
    run = tmp_path / "runs" / "multiple_choice"  # the run folder is named after the task's name
    results = json.loads((run / "results.json").read_text())
    assert (results["data"]["eval_split"], results["data"]["eval_examples"], results["data"]["train_examples"]) == (
        "test",
        6,
        16,
    )
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["split"], out["n"], out["headline"], out["accuracy"]) == (
        "test",
        6,
        "acc_norm",
        results["final_accuracy"],
    )


def test_scores_do_not_depend_on_batching() -> None:
    """Padding questions of different lengths and choice counts together changes no score."""
    model = make_heft("qwen2")
    task = get_task("arc_easy")
    rows = [
        {"question": q.removeprefix("Question : ").split("\n")[0], "choices": [c.strip() for c in cs], "label": 0}
        for q, cs in QUESTIONS
    ]
    encoded, _ = task.encode([task.to_example(r) for r in rows], model.tokenizer, 64)
    one = predict(model, task, encoded, batch_size=1, progress=False)
    three = predict(model, task, encoded, batch_size=3, progress=False)
    for a, b in zip(one, three):
        assert a.probs == pytest.approx(b.probs, abs=1e-5)


@pytest.mark.parametrize("name", ["arc_easy", "openbookqa"])
def test_reproduce_configs_run_the_boolq_arms_on_the_full_task(name: str) -> None:
    from heft.reproduce import load_plan

    boolq = load_plan(REPO / "configs" / "reproduce_boolq.yaml", ["preset=cpu"])
    plan = load_plan(REPO / "configs" / f"reproduce_{name}.yaml", ["preset=cpu"])
    assert list(plan.configs) == list(boolq.configs) and plan.seeds == [1, 2]
    for arm, by_seed in plan.configs.items():
        cfg = by_seed[1]
        assert (cfg.task, get_task(cfg.task).eval_split(cfg.data), cfg.max_train_examples, cfg.max_eval_examples) == (
            name,
            "test",
            None,
            None,
        )
        assert [(s.method, s.epochs, s.lr, s.reft.init) for s in cfg.stages] == [
            (s.method, s.epochs, s.lr, s.reft.init) for s in boolq.configs[arm][1].stages
        ]
    assert (
        load_plan(REPO / "configs" / f"reproduce_{name}.yaml", ["preset=smoke"])
        .configs["lora-20"][1]
        .max_train_examples
        == 16
    )


def test_evaluation_tokens_count_prompts_once_and_every_continuation() -> None:
    from heft.evaluate import scored_tokens
    from heft.tasks import EncodedExample

    mc = EncodedExample(
        input_ids=[5, 6, 7, 8], prompt_len=3, label=0, truncated=False, choice_ids=[[8], [9, 10], [11, 12, 13]]
    )
    single = EncodedExample(input_ids=[5, 6, 7], prompt_len=2, label=1, truncated=False)
    assert scored_tokens([mc]) == 3 + 1 + 2 + 3 and scored_tokens([single]) == 2 and scored_tokens([mc, single]) == 11
