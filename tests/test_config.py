"""Config loading: YAML + overrides -> validated dataclasses, and errors that point at the culprit."""

from pathlib import Path

import pytest

from heft.config import (
    ConfigError,
    RunConfig,
    StageConfig,
    config_from_dict,
    load_config,
    save_config,
)
from heft.config_loader import field_docs
from heft.config_reference import render_config_reference
from heft.methods.lora.config import LoraConfig
from heft.methods.reft.config import ReftConfig
from heft.tasks import get_task, task_for

EXAMPLE = """\
model: smollm2-135m
task: boolq
data:
  source: /data/boolq
  columns: {question: query}
max_train_examples: 200
stages:
  - method: lora
    epochs: 2
    lr: 3e-4
    lora:
      r: 4
      target_modules: [q_proj, v_proj]
  - method: loreft
    reft:
      rank: 2
      layers: [1, 3]
"""


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(EXAMPLE)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_load_types_and_implications(example: Path) -> None:
    cfg = load_config(example)
    first, second = cfg.stages
    assert first.lr == 3e-4 and isinstance(first.epochs, float) and first.epochs == 2.0
    assert first.lora.target_modules == ["q_proj", "v_proj"] and first.lora.r == 4
    assert cfg.data.columns == {"question": "query"} and cfg.max_train_examples == 200
    assert second.reft.layers == [1, 3] and second.reft.kind == "loreft"
    joint = {"method": "joint", "reft": {"kind": "direft"}}
    cfg = config_from_dict({"stages": [{"method": "dora"}, {"method": "direft"}, joint]})
    assert cfg.stages[0].lora.use_dora and [s.reft.kind for s in cfg.stages[1:]] == ["direft", "direft"]
    assert config_from_dict({}) == RunConfig()
    # the same from Python, without a config file; a settings object shared by two stages stays as it was
    shared = ReftConfig(rank=2)
    direft, loreft = StageConfig(method="direft", reft=shared), StageConfig(method="loreft", reft=shared)
    assert (direft.reft.kind, loreft.reft.kind, shared.kind) == ("direft", "loreft", "loreft")
    assert StageConfig(method="dora").lora.use_dora and not StageConfig(method="lora").lora.use_dora


def test_round_trip(example: Path, tmp_path: Path) -> None:
    cfg = load_config(example, ["stages.0.method=dora"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


def test_overrides(example: Path) -> None:
    cfg = load_config(
        example,
        [
            "stages.0.epochs=3",
            "max_train_examples=null",
            "data.source=/x",
            "stages.1.reft.layers=[2,4]",
            "stages.0.lora.target_modules=all-linear",
            "stages.1.lr=1e-5",
            "data.columns.label=answer",
        ],
    )
    assert cfg.stages[0].epochs == 3.0 and cfg.max_train_examples is None and cfg.data.source == "/x"
    assert cfg.stages[1].reft.layers == [2, 4] and cfg.stages[0].lora.target_modules == "all-linear"
    assert cfg.stages[1].lr == 1e-5 and cfg.data.columns == {"question": "query", "label": "answer"}
    cfg = load_config(example, ["stages=[{method: lora}, {method: direft, epochs: 0.5}]"])
    assert [s.method for s in cfg.stages] == ["lora", "direft"] and cfg.stages[1].epochs == 0.5


def test_override_fills_defaults(tmp_path: Path) -> None:
    overrides = ["stages.0.lora.r=2", "data.template=Q: {question} A:"]
    cfg = load_config(write(tmp_path, "task: boolq\n"), overrides)
    assert cfg.stages == [
        StageConfig(lora=LoraConfig(r=2, merge=True))
    ]  # an unset merge: true on a full-precision base
    assert cfg.data.template == "Q: {question} A:"


def test_unknown_key_suggests_and_points_at_line(example: Path, tmp_path: Path) -> None:
    msg = error(write(tmp_path, EXAMPLE.replace("    epochs: 2", "    epoch: 2")))
    assert "unknown key 'stages.0.epoch'" in msg and "bad.yaml line 9" in msg
    assert "did you mean 'epochs'?" in msg
    msg = error(write(tmp_path, EXAMPLE.replace("      rank: 2", "      rnak: 2")))
    assert "'stages.1.reft.rnak'" in msg and "line 16" in msg and "'rank'" in msg
    msg = error(example, ["stages.0.epoch=3"])
    assert "override 'stages.0.epoch=3'" in msg and "did you mean 'epochs'?" in msg


@pytest.mark.parametrize(
    "old, new, field, line, expected",
    [
        ("    epochs: 2", "    epochs: abc", "stages.0.epochs", 9, "float"),
        ("      r: 4", "      r: 0", "stages.0.lora.r", 12, "> 0"),
        ("  - method: loreft", "  - method: lorra", "stages.1.method", 14, "one of lora, dora"),
        ("      layers: [1, 3]", "      layers: [1, x]", "stages.1.reft.layers", 17, "str | list[int]"),
        ("max_train_examples: 200", "max_train_examples: yes", "max_train_examples", 6, "int | None"),
        ("  columns: {question: query}", "  columns: [a]", "data.columns", 5, "dict[str, str]"),
    ],
)
def test_bad_values_name_file_line_field(
    tmp_path: Path, old: str, new: str, field: str, line: int, expected: str
) -> None:
    msg = error(write(tmp_path, EXAMPLE.replace(old, new)))
    assert f"'{field}'" in msg and f"bad.yaml line {line}" in msg and expected in msg and "hint:" in msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stages.0.epochs=abc", "expected float"),
        ("stages.0.reft.positions=x7", "f<k>, l<k> or f<k>+l<k>"),
        ("stages.0.warmup_ratio=1", "[0, 1)"),
        ("dtype=float16", "one of float32, bfloat16"),
        ("eval_every=step", "one of epoch, stage, never, or a number of epochs > 0"),
        ("eval_every=0", "a number of epochs > 0"),
        ("stages.0.schedule=poly", "one of linear, cosine, constant"),
        ("stages=[]", "at least one stage"),
    ],
)
def test_bad_override_values(example: Path, override: str, expected: str) -> None:
    msg = error(example, [override])
    assert f"override '{override}'" in msg and expected in msg


def test_override_index_and_syntax(example: Path) -> None:
    msg = error(example, ["stages.2.epochs=1"])
    assert "'2'" in msg and "'stages'" in msg and "override 'stages.2.epochs=1'" in msg and "2 items" in msg
    assert "key=value" in error(example, ["stages.0.epochs"])
    assert "not a mapping or list" in error(example, ["model.name=x"])


def test_missing_file_and_yaml_syntax(tmp_path: Path) -> None:
    assert "nope.yaml" in error(tmp_path / "nope.yaml")
    msg = error(write(tmp_path, "model: x\nstages:\n  - method: lora\n   epochs: 2\n"))
    assert "invalid YAML in" in msg and "bad.yaml line 4" in msg
    assert "started on line 1" in error(write(tmp_path, "stages: [1,\nmodel: x\n"))
    assert "(top level)" in error(write(tmp_path, "- just\n- a list\n"))


def test_dict_source_named_in_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'modle' in sweep\[3\]; did you mean 'model'\?"):
        config_from_dict({"modle": "x"}, source="sweep[3]")


def test_field_docs_and_reference_up_to_date() -> None:
    assert field_docs(StageConfig)["epochs"].startswith("Passes over the training set.")
    readme = Path(__file__).resolve().parents[1] / "configs" / "README.md"
    assert readme.read_text() == render_config_reference(), "run `python -m heft.config_reference` to regenerate"


def test_a_merging_lora_stage_after_an_unmerged_one_is_refused_before_training(tmp_path: Path) -> None:
    path = write(
        tmp_path, "stages:\n  - method: lora\n    lora: {merge: false}\n  - method: loreft\n  - method: joint\n"
    )
    assert error(path) == (
        f"LoRA stage 2 cannot merge while stage 0's adapter stays unmerged in {path} line 5; "
        "set lora.merge: false here too, or lora.merge: true on stage 0"
    )
    assert len(load_config(path, ["stages.2.lora.merge=false"]).stages) == 3


# --- the task: a name or a mapping of a kind and its options, checked where tasks are resolved -----

TASK_MAPPING = """\
task:
  kind: multiple_choice
  template: "Q: {stem}\\nA:"
  headline: acc
data:
  columns: {choices: options}
"""


def task_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    cfg = load_config(path, overrides)  # the schema takes any name or mapping: it knows no registry
    with pytest.raises(ConfigError) as info:
        task_for(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_task_mapping_builds_its_kind_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, TASK_MAPPING))
    task = task_for(cfg)
    assert (task.kind, task.name, task.fields, task.headline, task.choice_delimiter, task.default_source) == (
        "multiple_choice",
        "multiple_choice",
        ("stem", "choices", "label"),
        "acc",
        " ",
        None,
    )
    assert task.to_example({"stem": "red?", "choices": ["a", "b"], "label": 1}).prompt == "Q: red?\nA:"
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg and task_for(again).fields == task.fields
    # a kind on its own takes its defaults, which are the presets' own settings
    mc, arc = task_for(config_from_dict({"task": "multiple_choice"})), get_task("arc_easy")
    assert (mc.template, mc.fields, mc.headline, mc.default_eval_split) == (
        arc.template,
        arc.fields,
        arc.headline,
        arc.default_eval_split,
    )
    yes_no, boolq = get_task("yes_no"), get_task("boolq")
    assert (yes_no.template, yes_no.fields, yes_no.choices, yes_no.truncate_field) == (
        boolq.template,
        boolq.fields,
        boolq.choices,
        boolq.truncate_field,
    )
    overridden = load_config(write(tmp_path, "model: x\n"), ["task.kind=yes_no", "task.truncate_field=null"])
    assert overridden.task == {"kind": "yes_no", "truncate_field": None} and task_for(overridden).truncate_field is None


@pytest.mark.parametrize(
    "old, new, key, line, words",
    [
        ("  kind: multiple_choice", "  kind: multiple_choise", "task.kind", 2, "did you mean 'multiple_choice'?"),
        ("  kind: multiple_choice", "  kind: arc_easy", "task.kind", 2, "a task, not a kind: write `task: arc_easy`"),
        ("  headline: acc", "  headlin: acc", "task.headlin", 4, "did you mean 'headline'?"),
        ("  headline: acc", "  headline: accuracy", "task.headline", 4, "expected 'acc' | 'acc_norm'"),
        ("{stem}", "{stem} {label}", "task.template", 3, "it names 'label', the field that holds the answer"),
        ("{stem}", "{stem", "task.template", 3, "not a template"),
        ("{stem}", "{0}", "task.template", 3, "fields are plain names"),
        ("{stem}", "stem", "task.template", 3, "names no field"),
        ("  headline: acc", "  truncate_field: passage", "task.truncate_field", 4, "template names (stem) or null"),
        ("{choices: options}", "{choises: options}", "data.columns.choises", 6, "did you mean 'choices'?"),
    ],
)
def test_bad_task_options_name_file_line_key(tmp_path: Path, old: str, new: str, key: str, line: int, words: str):
    msg = task_error(write(tmp_path, TASK_MAPPING.replace(old, new)))
    assert f"'{key}' in " in msg and f"bad.yaml line {line}" in msg and words in msg, msg


def test_bad_task_names_and_templates(tmp_path: Path) -> None:
    path = write(tmp_path, "model: x\ntask: boolqq\n")
    msg = task_error(path)
    assert msg.startswith(f"unknown task 'boolqq' in {path} line 2; did you mean 'boolq'? registered tasks: [")
    assert all(f"'{name}'" in msg for name in ("arc_easy", "boolq", "multiple_choice", "openbookqa", "yes_no"))
    assert "in override 'task=arc_eesy'; did you mean 'arc_easy'?" in task_error(path, ("task=arc_eesy",))
    msg = task_error(path, ("task=boolq", "data.template=Question {questoin}"))
    assert "'data.template' in override 'data.template=Question {questoin}'" in msg and "uses ['questoin']" in msg
    msg = task_error(write(tmp_path, "task:\n  kind: yes_no\n  choices: [' yes', ' yes']\n"))
    assert "'task.choices' in " in msg and "line 3" in msg and "two different" in msg
    msg = error(write(tmp_path, "task:\n  template: 'Q: {question}'\n"))  # the shape is the schema's to check
    assert "'task' in " in msg and "line 1" in msg and "a mapping of a 'kind'" in msg
    with pytest.raises(ConfigError, match=r"unknown task 'nope' in RunConfig; registered tasks"):
        task_for(RunConfig(task="nope"))  # a config made in Python is named by its type
