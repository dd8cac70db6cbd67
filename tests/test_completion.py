"""The completion task: prompt → response rows in three shapes, chat templates, bad rows, generation-based
evaluation, `heft train/eval/predict` on it, and the shipped example config on the real model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import WORDS, make_heft, make_model, make_tokenizer
from heft.cli import main
from heft.config import DataConfig, config_from_dict, load_config
from heft.config_loader import ConfigError
from heft.evaluate import completion_metrics, evaluate, generate_responses, response_logliks
from heft.io import load_run
from heft.tasks import CompletionTask, DataError, get_task, register_task, task_for
from heft.tasks.completion import EncodedCompletion
from heft.train import collate, run_training
from test_train import toy_config

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROWS = [
    {"prompt": "is the cat red", "response": "yes the cat"},
    {"prompt": "is the dog blue", "response": "no"},
]
"""The same two conversations in every shape (`shaped`)."""


def chat_tokenizer():
    """The tiny word-level tokenizer plus role tokens and a chat template that uses them."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def shaped(shape: str) -> list[dict]:
    if shape == "prompt":
        return [dict(row) for row in ROWS]
    if shape == "alpaca":
        return [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in ROWS]
    return [{"messages": as_messages(r)} for r in ROWS]


def as_messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(source: Path, split: str = "train", task: CompletionTask | None = None, **data) -> list:
    return (task or CompletionTask()).load_split(DataConfig(source=str(source), **data), split)


# ------------------------------------------------------------------------------------------ rows
@pytest.mark.parametrize("shape", ["prompt", "alpaca", "messages"])
@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
def test_every_shape_and_format_gives_the_same_conversations(shape, suffix, tmp_path):
    rows = shaped(shape)
    path = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:  # CSV holds a messages list as JSON text
        frame = pd.DataFrame([{k: json.dumps(v) if k == "messages" else v for k, v in r.items()} for r in rows])
        frame.to_csv(path, index=False)
    examples = load(tmp_path)
    assert [(ex.turns, ex.response) for ex in examples] == [([("user", r["prompt"])], r["response"]) for r in ROWS]
    assert examples[0].prompt == "User: is the cat red\nAssistant:" and examples[0].target == " yes the cat"
    where = {"jsonl": "line 2", "parquet": "row 2", "csv": "row 2 (line 3)"}[suffix]
    assert examples[1].origin == f"{path}: {where}"


def test_columns_are_renamed_and_alpaca_input_joins_the_instruction(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"q": "is the cat red", "a": "yes"}])
    [ex] = load(tmp_path, columns={"prompt": "q", "response": "a"})
    assert ex.turns == [("user", "is the cat red")] and ex.response == "yes"
    write_jsonl(tmp_path / "alpaca" / "train.jsonl", [{"instruction": "answer", "input": "is it red", "output": "no"}])
    [ex] = load(tmp_path / "alpaca")
    assert ex.turns == [("user", "answer\n\nis it red")]
    [ex] = load(tmp_path / "alpaca", template="{instruction}: {input}")
    assert ex.turns == [("user", "answer: is it red")]


def test_messages_keep_system_and_earlier_turns(tmp_path):
    turns = [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "is the cat red"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "is the dog red"},
        {"role": "assistant", "content": "no"},
    ]
    write_jsonl(tmp_path / "train.jsonl", [{"messages": turns}])
    [ex] = load(tmp_path)
    assert ex.response == "no" and [role for role, _ in ex.turns] == ["system", "user", "assistant", "user"]
    assert ex.prompt == "System: be short\nUser: is the cat red\nAssistant: yes\nUser: is the dog red\nAssistant:"


BAD_ROWS = [
    ({"prompt": "is it red", "response": "  "}, "line 2: field 'response': empty response"),
    ({"prompt": "", "response": "yes"}, "line 2: field 'prompt': empty prompt"),
    ({"instruction": "say", "input": "x", "output": ""}, "line 2: field 'output': empty response"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: field 'messages': no assistant turn"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yes"}]},
        "line 2: field 'messages': turn 2 has unknown role 'bot'",
    ),
    (
        {"messages": [*shaped("messages")[0]["messages"], {"role": "user", "content": "c"}]},
        "line 2: field 'messages': the conversation ends in a 'user' turn after its last assistant turn",
    ),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "empty response"),
    ({"messages": [{"role": "assistant", "content": "b"}]}, "field 'messages': no user turn before the response"),
    ({"messages": "not a list"}, "field 'messages': expected a non-empty list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_a_bad_row_is_refused_naming_file_row_and_field(bad, message, tmp_path):
    good = shaped("messages" if "messages" in bad else "alpaca" if "instruction" in bad else "prompt")[0]
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    with pytest.raises(DataError, match=message) as err:
        load(tmp_path)
    assert str(err.value).startswith(str(path))


def test_rows_of_no_known_shape_list_the_shapes_and_the_columns_found(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "is it red", "answer": "yes"}])
    with pytest.raises(DataError, match=r"none of the completion shapes.*found columns \['question', 'answer'\]"):
        load(tmp_path)
    with pytest.raises(DataError, match="data.columns maps unknown field"):
        load(tmp_path, columns={"query": "question"})
    with pytest.raises(DataError, match="has no data of its own: set data.source"):
        CompletionTask().load_split(DataConfig(), "train")


def test_answer_pattern_must_compile_and_find_the_reference_answer(tmp_path):
    with pytest.raises(ValueError, match=re.escape("answer_pattern '([0-9]+' does not compile: missing )")):
        CompletionTask(answer_pattern="([0-9]+")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "2 and 2", "response": "so 4"}, {"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=re.escape("line 2: field 'response': answer_pattern '[0-9]+' finds no answer")):
        load(tmp_path, task=CompletionTask(answer_pattern="[0-9]+"))
    with pytest.raises(ValueError, match="data.template does not apply to messages rows"):
        write_jsonl(tmp_path / "m" / "train.jsonl", shaped("messages"))
        load(tmp_path / "m", template="{prompt}")


def test_a_config_sets_the_completion_options_and_a_bad_one_names_its_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: m\ntask:\n  kind: completion\n  name: arith\n  answer_pattern: '-?\\d+'\n  stop: [\"\\n\\n\"]\n"
    )
    task = task_for(load_config(config))
    assert isinstance(task, CompletionTask) and task.name == "arith" and task.stop == ("\n\n",)
    assert task.is_correct("so 3 + 4 = 7", "7") and task.chat_template == "auto"
    config.write_text("model: m\ntask:\n  kind: completion\n  answer_pattern: '([0-9]+'\n")
    with pytest.raises(
        ConfigError, match=rf"'task.answer_pattern' in {re.escape(str(config))} line 4; .*does not compile"
    ):
        task_for(load_config(config))
    config.write_text("model: m\ntask: {kind: completion, max_new_tokens: 0}\n")
    with pytest.raises(ConfigError, match="task.max_new_tokens"):
        task_for(load_config(config))


def test_exact_match_normalises_and_answer_pattern_compares_the_last_match():
    task = CompletionTask()
    assert task.is_correct("  Answer: Red.\n", "answer: red.") and not task.is_correct("Answer: red", "Answer: red.")
    numbers = CompletionTask(answer_pattern=r"-?\d+")
    assert numbers.is_correct("3 + 4 makes 7", "The answer is 7.") and not numbers.is_correct("7, no 8", "7")
    assert not numbers.is_correct("no number", "7"), "no match in the generation is wrong, not an error"
    grouped = CompletionTask(answer_pattern=r"Answer: (\w+)")
    assert grouped.answer("Answer: Dog and Answer: CAT") == "cat"
    assert CompletionTask.cut_response("yes\nUser: and", ["\nUser:", "and"]) == "yes"


# ------------------------------------------------------------------------------------ tokenising
def test_plain_layout_learns_the_response_and_eos_and_reft_edits_the_prompt_only(tmp_path):
    tokenizer = make_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", shaped("prompt"))
    examples = load(tmp_path)
    encoded, truncated = CompletionTask().encode(examples, tokenizer, 32)
    ex = encoded[0]
    assert truncated == 0 and ex.reference == "yes the cat"
    assert ex.input_ids[: ex.prompt_len] == tokenizer(examples[0].prompt)["input_ids"]
    assert ex.input_ids[ex.prompt_len :] == tokenizer(" yes the cat")["input_ids"] + [tokenizer.eos_token_id]
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["prompt_mask"][0].sum() == ex.prompt_len, "interventions sit on the prompt"
    assert batch["labels"][0][ex.prompt_len : len(ex.input_ids)].tolist() == ex.input_ids[ex.prompt_len :]
    assert (batch["labels"][0][: ex.prompt_len] == -100).all(), "no loss on the prompt"


def test_chat_template_renders_prompts_and_closes_the_response_with_its_end_token(tmp_path):
    tokenizer = chat_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", shaped("messages"))
    examples = load(tmp_path)
    auto, none = CompletionTask(), CompletionTask(chat_template="none")
    [ex, _], _ = auto.encode(examples, tokenizer, 32)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "is the cat red"}], add_generation_prompt=True
    )
    assert ex.input_ids[: ex.prompt_len] == list(rendered["input_ids"])
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.convert_ids_to_tokens(ex.input_ids[ex.prompt_len :]) == ["yes", "the", "cat", "<|end|>"]
    assert auto.end_token_ids(tokenizer) == sorted({tokenizer.eos_token_id, end}) and auto.stop_strings(tokenizer) == []
    [plain, _], _ = none.encode(examples, tokenizer, 32)
    assert plain.input_ids[-1] == tokenizer.eos_token_id and none.stop_strings(tokenizer) == ["\nUser:"]
    assert CompletionTask().encode(examples, make_tokenizer(), 32)[0][0].input_ids == plain.input_ids, (
        "auto falls back to the plain layout for a tokenizer without a chat template"
    )


def test_a_prompt_that_leaves_no_room_for_its_response_is_an_error_naming_its_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[1], {"prompt": "the cat " * 20, "response": "yes"}])
    examples = load(tmp_path)
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: line 2: field 'prompt': the prompt takes 4\d tokens"
    ):
        CompletionTask().encode(examples, make_tokenizer(), 40)
    assert len(CompletionTask().encode(examples, make_tokenizer(), 60)[0]) == 2


# ------------------------------------------------------------------------------------ evaluation
def encoded_toy(n: int = 6, tokenizer=None) -> list[EncodedCompletion]:
    rows = [{"prompt": f"is the {w} red", "response": "yes" if i % 2 else "no"} for i, w in enumerate(WORDS[10:][:n])]
    examples = [CompletionTask().to_example(row) for row in rows]
    return CompletionTask().encode(examples, tokenizer or make_tokenizer(), 32)[0]


def test_batched_generation_equals_one_prompt_at_a_time_with_a_reft_stage():
    from test_pipeline import LOREFT

    model = make_heft("llama")
    stage = model.add_stage(LOREFT, seed=0)
    for module in stage.reft.interventions.values():
        module.source.bias.data.fill_(2.0)  # a strong edit, so a misplaced one shows
    model.finish_stage()
    task, data = CompletionTask(max_new_tokens=5), encoded_toy()
    batched = generate_responses(model, task, data, batch_size=4, progress=False)
    alone = [generate_responses(model, task, [ex], batch_size=1, progress=False)[0] for ex in data]
    assert batched == alone and any(batched)
    assert all(len(r.split()) <= 5 for r in batched), "at most max_new_tokens words (one token each)"


def test_response_loglik_is_the_training_loss_of_the_response():
    model, data = make_heft("llama"), encoded_toy()
    logliks = response_logliks(model, data, batch_size=4, progress=False)
    for ex, loglik in zip(data, logliks):
        batch = collate([ex], 0)
        out = model(**batch)
        assert loglik == pytest.approx(-float(out.loss) * out.target_tokens, rel=1e-4)


def test_completion_metrics_count_exact_matches_and_the_most_frequent_answer():
    data = encoded_toy(4)  # references no, yes, no, yes
    result = completion_metrics(CompletionTask(), data, ["No", "maybe", " no ", "yes."], [-1.0, -2.0, -3.0, -4.0])
    assert result["correct"] == "1010" and result["accuracy"] == result["exact_match"] == 0.5
    assert result["majority_accuracy"] == 0.5 and result["response_loglik"] == -2.5
    tokens = sum(len(ex.input_ids) - ex.prompt_len for ex in data)
    assert result["response_loglik_per_token"] == pytest.approx(-10.0 / tokens)


def test_evaluate_dispatches_completion_to_generation_and_leaves_the_model_mode():
    model = make_heft("llama")
    model.train()
    result = evaluate(model, CompletionTask(max_new_tokens=3), encoded_toy(), batch_size=4, progress=False)
    assert model.training and result["headline"] == "exact_match" and len(result["correct"]) == 6


# ---------------------------------------------------------------------------------- train / CLI
def write_toy_completion(folder: Path, shape: str = "prompt", n_train: int = 48, n_test: int = 16) -> Path:
    """Rows whose response is readable from the prompt's first word: `true …` → `yes`, `false …` → `no`."""
    g = torch.Generator().manual_seed(0)
    for split, n in [("train", n_train), ("test", n_test)]:
        rows = []
        for i in range(n):
            words = [WORDS[int(j)] for j in torch.randint(4, len(WORDS), (4,), generator=g)]
            prompt, response = ("true " if i % 3 else "false ") + " ".join(words), "yes" if i % 3 else "no"
            rows.append({"prompt": prompt, "response": response})
        if shape == "messages":
            rows = [{"messages": as_messages(r)} for r in rows]
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def completion_config(model_dir: Path, data: Path, out: Path, **overrides) -> dict:
    cfg = toy_config(model_dir, data, out, **{"task": "completion", "eval_every": "stage", **overrides})
    for stage in cfg["stages"]:
        stage["epochs"] = 3
    return cfg


def test_training_lifts_exact_match_above_zero_shot_and_eval_and_predict_agree(tmp_path, tiny_model_dir, capsys):
    data = write_toy_completion(tmp_path / "data")
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(completion_config(tiny_model_dir, data, tmp_path / "unused")))
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run), "-q"]) == 0
    results = json.loads((run / "results.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    zero, final = lines[0], [m for m in lines if m["kind"] == "eval"][-1]
    assert zero["stage"] == "zero-shot" and len(final["eval_correct"]) == 16
    assert final["eval_exact_match"] > zero["eval_exact_match"], (zero["eval_correct"], final["eval_correct"])
    assert final["eval_response_loglik"] > zero["eval_response_loglik"]
    assert results["final_accuracy"] == final["eval_exact_match"] == final["eval_accuracy"]

    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["exact_match"] == results["final_accuracy"] and evaluated["correct"] == final["eval_correct"]
    assert evaluated["mode"] == "generate"

    assert main(["predict", str(run), "--prompt", "true the cat is red"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    task, model = get_task("completion"), load_run(run)
    [query] = task.encode([task.to_query({"prompt": "true the cat is red"})], model.tokenizer, 32)[0]
    assert answer == {"prediction": generate_responses(model, task, [query], progress=False)[0].strip()}
    assert main(["predict", str(run), "--prompt", "true the cat is red", "--max-new-tokens", "1"]) == 0
    short = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prediction"]
    assert short == generate_responses(model, task, [query], progress=False, max_new_tokens=1)[0].strip()
    assert len(short.split()) <= 1 and answer["prediction"].startswith(short)

    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "false a dog"}, {"instruction": "true", "input": "cat"}])
    assert main(["predict", str(run), "--input", str(queries), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "prediction"}, {"instruction", "input", "prediction"}]


def test_messages_rows_train_with_the_models_chat_template(tmp_path):
    model_dir = tmp_path / "tiny-chat"
    make_model("llama").save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    data = write_toy_completion(tmp_path / "data", shape="messages", n_train=24, n_test=8)
    cfg = config_from_dict(completion_config(model_dir, data, tmp_path / "run", max_train_examples=24))
    results = run_training(cfg, tmp_path / "run", show_progress=False)
    assert results["stages"][0]["loss_at_end"] < results["stages"][0]["loss_at_start"]
    model = load_run(tmp_path / "run")
    assert model.tokenizer.chat_template == CHAT_TEMPLATE, "the run's tokenizer keeps its chat template"
    [ex] = get_task("completion").encode(load(data, "test")[:1], model.tokenizer, 32)[0]
    assert model.tokenizer.convert_ids_to_tokens(ex.input_ids)[0] == "<|user|>"


def test_a_bad_completion_row_fails_train_in_one_line_naming_file_row_and_field(tmp_path, tiny_model_dir, capsys):
    data = write_toy_completion(tmp_path / "data")
    with (data / "train.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "true a", "response": ""}) + "\n")
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(completion_config(tiny_model_dir, data, tmp_path / "run")))
    assert main(["train", str(config), "-q"]) == 2
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert f"{data / 'train.jsonl'}: line 49: field 'response': empty response" in first


def test_task_options_reach_a_registered_instance(tmp_path, tiny_model_dir):
    """Until the YAML task mapping lands, options are set on an instance registered under its own name."""
    register_task(CompletionTask(name="completion_short", max_new_tokens=1, chat_template="none"))
    data = write_toy_completion(tmp_path / "data", n_train=8, n_test=4)
    cfg = completion_config(tiny_model_dir, data, tmp_path / "run", task="completion_short")
    cfg["stages"] = cfg["stages"][:1]
    run_training(config_from_dict(cfg), tmp_path / "run", show_progress=False)
    model, task = load_run(tmp_path / "run"), get_task("completion_short")
    data_cfg = config_from_dict(cfg).data
    encoded = task.encode(task.load_split(data_cfg, "test"), model.tokenizer, 32)[0]
    assert all(len(r.split()) <= 1 for r in generate_responses(model, task, encoded, progress=False))


@pytest.mark.slow
def test_shipped_completion_config_learns_the_answer_style(tmp_path):
    """`heft train configs/completion_heft.yaml` on smollm2-135m, then `heft eval` and `heft predict`."""
    run = tmp_path / "run"

    def heft(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "heft", *args], cwd=REPO, env=dict(os.environ), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    budget = ["stages.0.epochs=1", "stages.1.epochs=0.5", "max_eval_examples=12", "boundary_examples=0"]
    heft("train", "configs/completion_heft.yaml", *budget, "--output-dir", str(run), "-q")
    results = json.loads((run / "results.json").read_text())
    assert results["final_accuracy"] > results["zero_shot_accuracy"], results
    assert json.loads(heft("eval", str(run)))["exact_match"] == results["final_accuracy"]
    answer = json.loads(heft("predict", str(run), "--prompt", "Name the animal in this sentence: A goat ate grass."))
    assert answer["prediction"].startswith("Answer: ") and answer["prediction"].endswith("."), answer
    assert load_run(run).tokenizer.chat_template, "the converted GGUF model keeps its chat template"


def test_a_hub_dataset_with_a_subset(monkeypatch) -> None:
    """`data.subset` reaches `datasets.load_dataset` for completion data too."""
    import datasets

    calls = []

    def load(source: str, name: str | None, split: str) -> datasets.Dataset:
        calls.append((source, name, split))
        return datasets.Dataset.from_list(
            [{"prompt": "2 + 2 =", "response": " 4"}, {"prompt": "3 + 3 =", "response": " 6"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", load)
    task = get_task("completion")
    got = task.load_split(DataConfig(source="me/sums", subset="easy"), "train")
    assert set(calls) == {("me/sums", "easy", "train")} and len(got) == 2  # a call per row shape tried
    assert task.describe_source(DataConfig(source="me/sums", subset="easy")) == "hub:me/sums (easy)"
