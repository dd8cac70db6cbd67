"""Tasks: BoolQ loading from every local format, validation messages, subsampling, encoding."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from heft.config import DataConfig
from heft.tasks import (
    DataError,
    Example,
    Task,
    YesNoOptions,
    YesNoTask,
    get_task,
    list_tasks,
    register_task,
    subsample,
)
from heft.tasks.data import resolve_source

BOOLQ_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "boolq"
MAPPED = {"passage": "context", "question": "query", "answer": "label"}


@pytest.fixture(scope="module")
def task() -> Task:
    return get_task("boolq")


@pytest.fixture(scope="module")
def splits(task: Task) -> dict[str, list[Example]]:
    cfg = DataConfig(source=str(BOOLQ_DIR))
    return {split: task.load_split(cfg, split) for split in ("train", "validation")}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """A few real rows plus awkward text (newline, quotes, comma, non-ASCII) for format round trips."""
    df = pd.read_parquet(BOOLQ_DIR / "validation.parquet").head(12).reset_index(drop=True)
    df.loc[0, "passage"] = 'Line one, with "quotes";\nline two: café — ☃'
    return df


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE trained in memory, adding a BOS token like many causal LMs do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [
        "The river flows north through the old town and into the sea.",
        "Question: is the river long? Answer: yes. Answer: no.",
        "Persian is spoken in Iran and Afghanistan and Tajikistan.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")


def write(df: pd.DataFrame, path: Path) -> Path:
    """Write `df` in the format named by the suffix, with mapped column names and text labels."""
    out = df.rename(columns=MAPPED)
    spellings = ["True", "false", " YES ", "no", "1", "0"]
    out["label"] = [spellings[(i % 3) * 2 + (0 if v else 1)] for i, v in enumerate(out["label"])]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in out.to_dict("records")), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(out.to_dict("records"), indent=1), encoding="utf-8")
    else:
        out.to_csv(path, index=False)
    return path


# --- real data ---------------------------------------------------------------------------------


def test_real_boolq_counts_and_prompt(splits: dict[str, list[Example]]) -> None:
    train, val = splits["train"], splits["validation"]
    assert (len(train), len(val)) == (9427, 3270)
    assert Counter(e.label for e in train) == {1: 5874, 0: 3553}
    assert Counter(e.label for e in val) == {1: 2033, 0: 1237}
    first = train[0]
    assert first.prompt == (
        first.fields["passage"] + "\nQuestion: do iran and afghanistan speak the same language?\nAnswer:"
    )
    assert first.prompt.startswith("Persian (/ˈpɜːrʒən, -ʃən/), also known by its endonym Farsi")
    assert (first.target, first.label, first.fields["answer"]) == (" yes", 1, True)
    assert all(e.target == [" no", " yes"][e.label] for e in val)


def test_subsample_is_stratified_and_seeded(task: Task, splits: dict[str, list[Example]]) -> None:
    val = splits["validation"]
    cfg = DataConfig(source=str(BOOLQ_DIR))
    a = task.load_split(cfg, "validation", max_examples=200, seed=3)
    b = task.load_split(cfg, "validation", max_examples=200, seed=3)
    c = task.load_split(cfg, "validation", max_examples=200, seed=4)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert len(a) == 200
    assert abs(sum(e.label for e in a) - 200 * 2033 / 3270) <= 1
    position = {id(e): i for i, e in enumerate(val)}
    picked = [position[id(e)] for e in subsample(val, 50, seed=0)]
    assert picked == sorted(picked)  # the sample keeps split order
    assert subsample(val, 10_000, seed=0) == val


def test_subsample_small_and_odd_proportions() -> None:
    items = [{"y": y} for y in [0] * 7 + [1] * 2 + [2] * 1]
    for n in range(11):
        got = subsample(items, n, seed=0, label=lambda r: r["y"])
        assert len(got) == n
        counts = Counter(r["y"] for r in got)
        for y, total in ((0, 7), (1, 2), (2, 1)):
            assert abs(counts[y] - n * total / 10) < 1
    with pytest.raises(ValueError, match="negative"):
        subsample(items, -1, seed=0, label=lambda r: r["y"])


# --- local formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["validation.jsonl", "validation.csv", "validation.json"])
def test_formats_with_mapped_columns_match_parquet(task: Task, frame: pd.DataFrame, tmp_path: Path, name: str) -> None:
    frame.to_parquet(tmp_path / "ref.parquet")
    ref = task.load_split(DataConfig(source=str(tmp_path / "ref.parquet")), "validation")
    folder = tmp_path / "mapped"
    folder.mkdir()
    write(frame, folder / name)
    got = task.load_split(DataConfig(source=str(folder), columns=MAPPED), "validation")
    assert [(e.prompt, e.target, e.label) for e in got] == [(e.prompt, e.target, e.label) for e in ref]
    assert got[0].fields["passage"] == frame.loc[0, "passage"]


def test_json_lines_with_json_name_and_hub_shards(task: Task, frame: pd.DataFrame, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    frame.head(5).to_parquet(tmp_path / "data" / "train-00000-of-00002.parquet")
    frame.tail(7).to_parquet(tmp_path / "data" / "train-00001-of-00002.parquet")
    got = task.load_split(DataConfig(source=str(tmp_path)), "train")
    assert [e.fields["question"] for e in got] == list(frame["question"])
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")), encoding="utf-8")
    assert len(task.load_split(DataConfig(source=str(lines)), "anything")) == len(frame)


def test_template_override(task: Task, frame: pd.DataFrame, tmp_path: Path) -> None:
    frame.to_parquet(tmp_path / "train.parquet")
    cfg = DataConfig(source=str(tmp_path), template="Q: {question}\nContext: {passage}\nA:")
    ex = task.load_split(cfg, "train")[1]
    assert ex.prompt == f"Q: {frame.loc[1, 'question']}\nContext: {frame.loc[1, 'passage']}\nA:"
    with pytest.raises(ValueError, match="answer"):
        task.load_split(DataConfig(source=str(tmp_path), template="{passage} {answer}"), "train")


# --- bad input ---------------------------------------------------------------------------------


def expect_error(task: Task, path: Path, *parts: str, max_examples: int | None = None) -> None:
    with pytest.raises(DataError) as info:
        cfg = DataConfig(source=str(path), columns=MAPPED)
        task.load_split(cfg, "train", max_examples=max_examples)
    message = str(info.value)
    assert str(path) in message
    message = message.replace(str(path), "")  # tmp_path's name must not satisfy the checks below
    for part in parts:
        assert part in message, (part, message)


def test_missing_column(task: Task, frame: pd.DataFrame, tmp_path: Path) -> None:
    bad_csv = write(frame, tmp_path / "train.csv")
    pd.read_csv(bad_csv).drop(columns="query").to_csv(bad_csv, index=False)
    expect_error(task, bad_csv, "line 1", "'question'", "'query'", "context")
    bad_jsonl = write(frame, tmp_path / "train.jsonl")
    lines = bad_jsonl.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[2])
    del record["query"]
    lines[2] = json.dumps(record)
    bad_jsonl.write_text("\n".join(lines), encoding="utf-8")
    expect_error(task, bad_jsonl, "line 3", "'question'")
    frame.drop(columns="question").to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet.*'question'"):
        task.load_split(DataConfig(source=str(tmp_path / "x.parquet")), "train")


@pytest.mark.parametrize(
    ("suffix", "content"),
    [(s, c) for s in (".csv", ".jsonl", ".json", ".parquet") for c in (b"", b"\n \n")]
    + [(".csv", b"context,query,label\n"), (".json", b"[]")],
)
def test_empty_file(task: Task, tmp_path: Path, suffix: str, content: bytes) -> None:
    path = tmp_path / f"train{suffix}"
    path.write_bytes(content)
    expect_error(task, path, "empty")


def test_bad_label(task: Task, frame: pd.DataFrame, tmp_path: Path) -> None:
    path = write(frame, tmp_path / "train.csv")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[3, "label"] = "maybe"
    df.to_csv(path, index=False)
    expect_error(task, path, "row 4", "'answer'", "'maybe'")
    path = write(frame, tmp_path / "train.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[5] = lines[5].replace('"label": "', '"label": "maybe')
    path.write_text("\n".join(lines), encoding="utf-8")
    expect_error(task, path, "line 6", "'answer'")


def test_bad_text(task: Task, frame: pd.DataFrame, tmp_path: Path) -> None:
    path = write(frame, tmp_path / "train.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    record["query"] = 17
    lines[1] = json.dumps(record)
    record["query"] = "   "
    lines[4] = json.dumps(record)
    path.write_text("\n".join(lines), encoding="utf-8")
    expect_error(task, path, "line 2", "'question'", "17")
    lines[1] = lines[0]
    path.write_text("\n".join(lines), encoding="utf-8")
    expect_error(task, path, "line 5", "'question'", "empty")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_bytes(task: Task, frame: pd.DataFrame, tmp_path: Path, suffix: str) -> None:
    path = write(frame.iloc[1:], tmp_path / f"train{suffix}")
    raw = path.read_bytes().split(b"\n")
    raw[3] = raw[3].replace(b"the", b"th\xe9", 1)  # Latin-1 e-acute inside a question or passage
    assert b"\xe9" in raw[3]
    path.write_bytes(b"\n".join(raw))
    where = "line 4" if suffix == ".jsonl" else "row 3 (line 4)"
    with pytest.raises(DataError) as info:
        task.load_split(DataConfig(source=str(path), columns=MAPPED), "train")
    message = str(info.value)
    assert path.name in message and where in message and "UTF-8" in message and "0xe9" in message
    assert "field 'passage'" in message or "field 'question'" in message


def test_empty_after_filtering(task: Task, frame: pd.DataFrame, tmp_path: Path) -> None:
    path = write(frame, tmp_path / "train.csv")
    expect_error(task, path, "empty", "max_examples=0", max_examples=0)


def test_bad_sources(task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="does not exist"):
        task.load_split(DataConfig(source=str(tmp_path / "nope")), "train")
    (tmp_path / "train.tsv").write_text("x")
    with pytest.raises(DataError, match=r"no file for split 'train'.*train\.tsv"):
        task.load_split(DataConfig(source=str(tmp_path)), "train")
    (tmp_path / "train.csv").write_text("x")
    (tmp_path / "train.jsonl").write_text("x")
    with pytest.raises(DataError, match="ambiguous"):
        task.load_split(DataConfig(source=str(tmp_path)), "train")
    with pytest.raises(DataError, match="unknown field"):
        task.load_split(DataConfig(source=str(tmp_path), columns={"query": "q"}), "train")

    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("HEFT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"google/boolq.*unreachable.*data\.source.*HEFT_DATA_DIR"):
        task.load_split(DataConfig(), "train")


def test_hub_source(task: Task, frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id goes through `datasets.load_dataset` (stubbed here: no network in tests)."""
    import datasets

    calls = []

    def fake_load(source: str, name: str | None, split: str) -> datasets.Dataset:
        assert name is None
        calls.append((source, split))
        return datasets.Dataset.from_pandas(frame.rename(columns=MAPPED).assign(extra=1))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.delenv("HEFT_DATA_DIR", raising=False)
    got = task.load_split(DataConfig(columns=MAPPED), "validation", max_examples=4)
    assert calls == [("google/boolq", "validation")]
    assert len(got) == 4 and all(e.fields["question"] in set(frame["question"]) for e in got)
    with pytest.raises(DataError, match=r"google/boolq \[validation\].*'passage'"):
        task.load_split(DataConfig(), "validation")


# --- source resolution and registry ------------------------------------------------------------


def test_heft_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig()
    monkeypatch.delenv("HEFT_DATA_DIR", raising=False)
    assert resolve_source("boolq", cfg, "google/boolq") == "google/boolq"
    monkeypatch.setenv("HEFT_DATA_DIR", str(tmp_path))
    assert resolve_source("boolq", cfg, "google/boolq") == "google/boolq"  # nothing there yet
    (tmp_path / "validation.csv").write_text("passage,question,answer\n")
    assert resolve_source("boolq", cfg, "google/boolq") == str(tmp_path)
    (tmp_path / "boolq").mkdir()
    assert resolve_source("boolq", cfg, "google/boolq") == str(tmp_path / "boolq")
    assert resolve_source("boolq", DataConfig(source="mine"), "google/boolq") == "mine"
    task = get_task("boolq")
    assert task.describe_source(cfg) == str((tmp_path / "boolq").resolve())
    assert task.describe_source(DataConfig(source="someone/boolq")) == "hub:someone/boolq"


def test_heft_data_dir_loads(task: Task, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "boolq").symlink_to(BOOLQ_DIR)
    monkeypatch.setenv("HEFT_DATA_DIR", str(tmp_path))
    assert len(task.load_split(DataConfig(), "validation", max_examples=30)) == 30


def test_registry() -> None:
    assert "boolq" in list_tasks()
    assert isinstance(get_task("boolq"), YesNoTask)
    with pytest.raises(ValueError, match="did you mean 'boolq'"):
        get_task("BoolQQ")

    with pytest.raises(ValueError, match="already registered"):
        register_task(YesNoTask(YesNoOptions(name="boolq", template="{passage}\nQ: {question}?\nA:")))
    register_task(YesNoTask(YesNoOptions(name="boolq"), default_source="google/boolq"))  # the same again is no clash


# --- kinds: one code path per row shape, configured in YAML --------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_yes_no_kind_with_its_own_template_and_choices(tmp_path: Path) -> None:
    spec = {"kind": "yes_no", "template": "Review: {text}\nGood:", "choices": [" no", " yes"], "truncate_field": None}
    task = get_task(spec)
    rows = [{"text": "great", "answer": "true"}, {"text": "bad", "answer": False}, {"text": "fine", "answer": " Yes"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    got = task.load_split(DataConfig(source=str(path)), "train")
    assert [(e.prompt, e.target, e.label) for e in got] == [
        ("Review: great\nGood:", " yes", 1),
        ("Review: bad\nGood:", " no", 0),
        ("Review: fine\nGood:", " yes", 1),
    ]
    assert task.fields == ("text", "answer") and task.scoring == "first_token" and task.default_source is None
    with pytest.raises(DataError, match="task 'yes_no' has no default data and data.source is unset"):
        task.load_split(DataConfig(), "train")


@pytest.mark.parametrize(
    ("kind", "bad", "field", "words"),
    [
        ("yes_no", {"text": "", "answer": 1}, "text", "empty text"),
        ("yes_no", {"text": "ok", "answer": "maybe"}, "answer", "cannot parse label 'maybe'"),
        ("yes_no", {"text": 3, "answer": 1}, "text", "expected text, got int"),
        ("multiple_choice", {"text": "q", "choices": ["a"], "label": 0}, "choices", "at least two"),
        ("multiple_choice", {"text": "q", "choices": ["a", "b"], "label": 2}, "label", "outside the 2 choices"),
        ("multiple_choice", {"text": " ", "choices": ["a", "b"], "label": 0}, "text", "empty text"),
    ],
)
def test_each_kind_refuses_a_bad_row_naming_file_row_field(
    tmp_path: Path, kind: str, bad: dict, field: str, words: str
) -> None:
    task = get_task({"kind": kind, "template": "T: {text}", "truncate_field": None})
    good = {"text": "fine", "answer": 1, "choices": ["a", "b"], "label": 0}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {**good, **bad}])
    with pytest.raises(DataError) as info:
        task.load_split(DataConfig(source=str(path)), "train")
    assert str(info.value).startswith(f"{path}: line 2: field '{field}': ") and words in str(info.value)


def test_a_kind_joins_by_name_with_or_without_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import heft.tasks as tasks_module
    from heft.config_loader import ConfigError

    monkeypatch.setattr(tasks_module, "_KINDS", dict(tasks_module._KINDS))  # this test's kinds stay here

    class Plain(Task):  # configured by class attributes alone, as a kind written without `Options`
        name = "plain"
        label_field = "answer"
        template = "{text} ?"
        choices = (" a", " b")

    tasks_module.register_kind(Plain, "plain_kind")
    assert isinstance(get_task("plain_kind"), Plain) and get_task({"kind": "plain_kind"}).fields == ("text", "answer")
    with pytest.raises(ConfigError, match="task kind 'plain_kind' takes no options"):
        get_task({"kind": "plain_kind", "template": "{x}"})
    with pytest.raises(ValueError, match="already registered"):
        tasks_module.register_kind(Plain, "yes_no")


def test_a_template_naming_a_missing_column_names_the_template_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"stem": "q", "choices": ["a", "b"], "label": 0}])
    task = get_task({"kind": "multiple_choice", "template": "Q: {question}\nA:"})
    with pytest.raises(DataError) as info:
        task.load_split(DataConfig(source=str(path)), "train")
    assert f"{path}: line 1: missing column 'question' for field 'question', which task.template names" in str(
        info.value
    )
    assert info.value.hint.startswith("fix task.template, or if the file names it otherwise")
    with pytest.raises(DataError, match=r"for field 'question', which data.template names; found columns \['stem'"):
        get_task("arc_easy").load_split(DataConfig(source=str(path), template="Say {question}"), "train")
    with pytest.raises(DataError, match=r"for field 'question'; found columns"):  # a preset's own template: no key
        get_task("arc_easy").load_split(DataConfig(source=str(path)), "train")


# --- the evaluation split: the task's default, or what a local folder holds --------------------


@pytest.mark.parametrize(
    ("files", "name", "expected"),
    [
        (["train", "validation", "test"], "boolq", "validation"),
        (["train", "test"], "boolq", "test"),
        (["train", "validation", "test"], "arc_easy", "test"),
        (["train", "validation"], "multiple_choice", "validation"),
        (["train"], "arc_easy", "train"),
    ],
)
def test_eval_split_takes_what_the_folder_has(tmp_path: Path, files: list[str], name: str, expected: str) -> None:
    for split in files:
        (tmp_path / f"{split}.jsonl").write_text("{}\n")
    task = get_task(name)
    assert task.eval_split(DataConfig(source=str(tmp_path))) == expected
    assert task.eval_split(DataConfig(source=str(tmp_path), eval_split="other")) == "other"  # set: used as is


def test_eval_split_when_nothing_fits(tmp_path: Path) -> None:
    (tmp_path / "dev.jsonl").write_text("{}\n")
    (tmp_path / "training.csv").write_text("a\n")
    with pytest.raises(DataError) as info:
        get_task("arc_easy").eval_split(DataConfig(source=str(tmp_path)))
    assert str(info.value) == (
        f"{tmp_path}: no file for an evaluation split (test, validation) nor for the training split 'train'; "
        "the folder has ['dev.jsonl', 'training.csv']"
    )
    assert "data.eval_split=<file stem>" in info.value.hint and "data.train_split=<file stem>" in info.value.hint
    single = tmp_path / "dev.jsonl"  # a single file serves every split; the hub names its own
    assert get_task("arc_easy").eval_split(DataConfig(source=str(single))) == "test"
    assert get_task("boolq").eval_split(DataConfig(source="someone/boolq")) == "validation"


def test_a_folder_with_only_train_evaluates_on_held_out_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from heft.config import config_from_dict
    from heft.data import read_splits

    rows = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(30)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = config_from_dict({"task": "multiple_choice", "data": {"source": str(tmp_path)}})
    with caplog.at_level("WARNING", logger="heft"):
        splits = read_splits(get_task("multiple_choice"), cfg)
    assert (splits.eval_split, len(splits.evaluation), len(splits.train)) == ("train", 3, 27)
    assert not {e.prompt for e in splits.evaluation} & {e.prompt for e in splits.train}
    assert "holds no evaluation split: evaluating on 3 examples held out of 'train'" in caplog.text
    cfg.max_eval_examples = 6
    assert len(read_splits(get_task("multiple_choice"), cfg).evaluation) == 6


# --- prompt, labels, generations ---------------------------------------------------------------


def test_labels_and_generations(task: Task) -> None:
    pairs = [(True, 1), (False, 0), (1, 1), (0, 0), (" Yes", 1), ("FALSE", 0), ("1", 1), ("no", 0)]
    for value, label in pairs:
        assert task.parse_label(value) == label
    for value in ["maybe", 2, None, 0.5, ""]:
        with pytest.raises(ValueError):
            task.parse_label(value)
    assert task.parse_generation(" Yes, it is.") == 1
    assert task.parse_generation("no") == 0
    assert task.parse_generation("True.") == 1
    assert task.parse_generation("false") == 0
    assert task.parse_generation("Maybe yes") is None
    assert task.parse_generation("") is None
    assert task.metric([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_choice_token_ids(task: Task, tok) -> None:
    ids = task.choice_token_ids(tok)
    assert ids == [tok(c, add_special_tokens=False)["input_ids"][0] for c in task.choices]
    assert len(set(ids)) == 2

    clash = YesNoTask(YesNoOptions(choices=[" yes", " yes please"]))
    with pytest.raises(ValueError, match="first token"):
        clash.choice_token_ids(tok)


# --- encoding and truncation -------------------------------------------------------------------


def make_example(task: Task, passage: str, question: str, answer: bool) -> Example:
    return task.to_example({"passage": passage, "question": question, "answer": answer})


def test_encode_and_truncate(task: Task, tok) -> None:
    long_passage = " ".join(["The river flows north through the old town and into the sea."] * 12)
    examples = [
        make_example(task, "Persian is spoken in Iran.", "is persian spoken in iran", True),
        make_example(task, long_passage, "is the river long", False),
        make_example(task, long_passage + " Tajikistan.", "is persian spoken in tajikistan", True),
        make_example(task, "The sea.", "is the sea old", False),
    ]
    max_length = 60
    full = [tok(e.prompt)["input_ids"] + tok(e.target, add_special_tokens=False)["input_ids"] for e in examples]
    expected_truncated = [len(ids) > max_length for ids in full]
    assert expected_truncated == [False, True, True, False]

    encoded, n_truncated = task.encode(examples, tok, max_length)
    assert n_truncated == 2
    for ex, enc, ids, truncated in zip(examples, encoded, full, expected_truncated):
        assert enc.truncated == truncated and enc.label == ex.label
        assert len(enc.input_ids) <= max_length
        assert enc.input_ids[0] == tok.bos_token_id
        target = tok(ex.target, add_special_tokens=False)["input_ids"]
        assert enc.input_ids[enc.prompt_len :] == target
        prompt = tok.decode(enc.input_ids[: enc.prompt_len], skip_special_tokens=True)
        assert prompt.endswith(f"\nQuestion: {ex.fields['question']}?\nAnswer:")
        if truncated:
            assert len(enc.input_ids) >= max_length - 3  # the passage keeps as much as fits
            assert ex.fields["passage"].startswith(prompt.split("\nQuestion:")[0])
        else:
            assert enc.input_ids == ids and enc.prompt_len == len(tok(ex.prompt)["input_ids"])
    assert task.encode([], tok, max_length) == ([], 0)


def test_truncation_impossible_names_example(task: Task, tok) -> None:
    examples = [
        make_example(task, "Short.", "ok", True),
        make_example(task, "Passage.", "is this question far too long to fit in the budget", True),
    ]
    with pytest.raises(ValueError, match=r"example 1 .*far too long.*max_length"):
        task.encode(examples, tok, 20)


def test_encode_real_boolq_prefix(task: Task, splits: dict[str, list[Example]], tok) -> None:
    """A slice of real BoolQ at a small max_length: everything fits and keeps its answer slot."""
    examples = splits["validation"][:200]
    encoded, n_truncated = task.encode(examples, tok, 128)
    assert n_truncated == sum(e.truncated for e in encoded) > 0
    assert all(len(e.input_ids) <= 128 for e in encoded)
    answer = tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    assert all(e.input_ids[e.prompt_len - len(answer) : e.prompt_len] == answer for e in encoded)


def test_csv_written_by_stdlib_quotes_roundtrip(task: Task, tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["passage", "question", "answer", "extra"])
        w.writerow(['a, "b"\r\nc', "q one", "yes", ""])
        w.writerow([])
        w.writerow(["d", "q two", "0", "x"])
    got = task.load_split(DataConfig(source=str(path)), "train")
    assert [(e.fields["passage"], e.label) for e in got] == [('a, "b"\r\nc', 1), ("d", 0)]


@pytest.fixture(scope="module")
def llama2_style_tok():
    """A SentencePiece-style BPE shaped like Llama-2's tokenizer.json: a normalizer that prepends "▁" and
    turns spaces into "▁", no pre-tokenizer. Like Llama-2's, it tokenises " yes" alone as ['▁', '▁yes']."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # while training: no merges across words
    corpus = [
        "Persian is spoken in Iran.\nQuestion: is persian spoken in iran?\nAnswer: yes",
        "The sea.\nQuestion: is the sea old?\nAnswer: no",
        "Question: what is red?\nAnswer: the old town",
    ] * 20
    backend.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"], show_progress=False)
    )
    backend.pre_tokenizer = None
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


def test_answers_tokenise_as_they_follow_the_prompt(task: Task, llama2_style_tok) -> None:
    """Targets and choices are tokenised after their prompt (as lm-eval splits context and continuation),
    not alone, where a SentencePiece tokenizer would start them with a lone "▁" token."""
    tok = llama2_style_tok
    assert tok.convert_ids_to_tokens(tok(" yes", add_special_tokens=False)["input_ids"]) == ["▁", "▁yes"]
    assert tok.convert_ids_to_tokens(task.choice_token_ids(tok)) == ["▁no", "▁yes"]
    examples = [
        make_example(task, "Persian is spoken in Iran.", "is persian spoken in iran", True),
        make_example(task, "The sea.", "is the sea old", False),
    ]
    encoded, _ = task.encode(examples, tok, max_length=64)
    for ex, enc in zip(examples, encoded):
        assert enc.input_ids == tok(ex.prompt + ex.target)["input_ids"]
        assert enc.input_ids[enc.prompt_len] == task.choice_token_ids(tok)[ex.label]
    arc = get_task("arc_easy")
    question = arc.to_example({"question": "what is red", "choices": ["the old town", "yes"], "label": 0})
    (mc,), _ = arc.encode([question], tok, max_length=64)
    prompt_ids = tok(question.prompt)["input_ids"]
    assert mc.input_ids[: mc.prompt_len] == prompt_ids
    assert mc.choice_ids == [tok(question.prompt + c)["input_ids"][len(prompt_ids) :] for c in question.choices]
    assert [tok.convert_ids_to_tokens(ids)[0] for ids in mc.choice_ids] == ["▁the", "▁yes"]
