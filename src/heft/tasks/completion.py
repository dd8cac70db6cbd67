"""Free-form completion: each row is a prompt and the response to learn, scored by generating.

Rows come in three shapes, taken in this order (the first whose columns the file has; `data.columns`
renames them): OpenAI-style `messages` lists (system/user/assistant turns, the last assistant turn
is the response), alpaca-style `instruction`/`input`/`output`, and `prompt`/`response`. Every row
becomes a conversation that ends in its response. With `chat_template: auto` the tokenizer's chat
template renders it when the model has one (instruction-tuned models were trained on that layout),
else, as with `chat_template: none`, the plain `User: …\\nAssistant: …` layout. The loss covers the
response and the token that ends it, so a trained model stops by itself; ReFT edits the prompt
positions only, as pyreft does. Evaluation generates greedily and compares the response, stripped
and case-folded (or the answer `answer_pattern` extracts from it), with the reference.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from heft.config import DataConfig
from heft.config_loader import OptionError
from heft.tasks.base import EncodedExample, Example, Task, continuation_ids
from heft.tasks.data import (
    DataError,
    FieldError,
    MissingColumn,
    Row,
    parse_rows,
    read_rows,
    resolve_source,
    source_label,
    subsample,
)

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
"""Roles a `messages` turn may have, and their labels in the plain layout."""
PLAIN_STOP = "\nUser:"
"""Where a response ends in the plain layout when the model goes on to write the next turn itself."""


@dataclass(frozen=True)
class RowShape:
    """One accepted layout of completion rows."""

    fields: tuple[str, ...]
    response_field: str
    prompt_field: str
    """The field named when the prompt is too long."""

    @property
    def text_fields(self) -> tuple[str, ...]:
        """Fields a `data.template` may name (it renders the user's turn from them)."""
        return tuple(f for f in self.fields if f != self.response_field)

    @property
    def name(self) -> str:
        return "/".join(self.fields)


MESSAGES = RowShape(("messages",), "messages", "messages")
ALPACA = RowShape(("instruction", "input", "output"), "output", "instruction")
PROMPT = RowShape(("prompt", "response"), "response", "prompt")
SHAPES = (MESSAGES, ALPACA, PROMPT)


@dataclass
class Conversation(Example):
    """A completion row: the turns before the response, and the response (None for a row to predict)."""

    turns: list[tuple[str, str]] = field(default_factory=list)
    """(role, content) pairs, ending in a user turn."""
    response: str | None = None
    origin: str = ""
    """`<file>: <row>` the conversation came from, for errors found only when it is tokenised."""
    prompt_field: str = PROMPT.prompt_field


@dataclass
class EncodedCompletion(EncodedExample):
    """Prompt + response tokens (with the response's end token), and the reference text to compare with."""

    reference: str | None = None
    """The gold response as written in the data; None for a row to predict."""


def compile_answer_pattern(pattern: str | None) -> re.Pattern | None:
    """`answer_pattern` compiled, or a one-line error naming it."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"answer_pattern {pattern!r} does not compile: {e}") from None


@dataclass
class CompletionOptions:
    """Options of the completion kind (`task: {kind: completion, answer_pattern: '-?\\d+'}`)."""

    name: str = "completion"
    """Label of the task in run folders and tables, and its folder under `$HEFT_DATA_DIR`."""
    chat_template: Literal["auto", "none"] = "auto"
    """`auto`: the tokenizer's chat template when it has one (instruction-tuned models were trained
    on that layout); `none`: the plain `User: …\\nAssistant: …` layout."""
    answer_pattern: str | None = None
    """A regex; when set, the answers compared are its last match in the generation and in the
    reference (its first group when it has one), e.g. `-?\\d+` for the last number."""
    max_new_tokens: int = 64
    """Where generation stops at the latest."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a response (cut off with what follows), beside the tokenizer's end tokens."""

    def __post_init__(self) -> None:
        if self.chat_template not in ("auto", "none"):
            raise OptionError("chat_template", f"{self.chat_template!r}: expected auto or none")
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"{self.max_new_tokens}: expected a value > 0")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise OptionError("stop", f"{self.stop!r}: expected a list of non-empty strings")
        try:
            compile_answer_pattern(self.answer_pattern)
        except ValueError as e:
            raise OptionError("answer_pattern", str(e)) from None


class CompletionTask(Task):
    """Prompt → response rows, trained on the response and scored by exact match of a greedy generation."""

    kind = "completion"
    Options = CompletionOptions
    fields = PROMPT.fields
    label_field = PROMPT.response_field
    template = "{prompt}"
    default_source = ""
    """Empty: completion data is always the user's own (`data.source` or `$HEFT_DATA_DIR/completion`)."""
    default_eval_split = "test"
    scoring = "generation"
    headline = "exact_match"

    def __init__(self, options: CompletionOptions | None = None, **settings: Any) -> None:
        """Settings from `options`, or as keywords for Python users:
        `CompletionTask(name="arith", answer_pattern=r"-?\\d+")`."""
        if options is not None and settings:
            raise TypeError("give CompletionTask either options or keyword settings, not both")
        super().__init__(options if options is not None else CompletionOptions(**settings))
        self.stop = tuple(self.stop)
        self._answer_re = compile_answer_pattern(self.answer_pattern)

    # ------------------------------------------------------------------------------------- rows
    def load_split(
        self, data_cfg: DataConfig, split: str, max_examples: int | None = None, seed: int = 0
    ) -> list[Example]:
        """Read a split in whichever shape its file has; every row is checked before any is returned."""
        shape, rows = read_shape(self._source(data_cfg), split, data_cfg.columns, data_cfg.subset)
        template = checked_template(data_cfg.template, shape)
        examples = parse_rows(rows, lambda values: self._conversation(values, shape, template, query=False))
        for example, row in zip(examples, rows):
            example.origin = f"{row.file}: {row.where}"
        return subsample(examples, max_examples, seed) if max_examples is not None else examples

    def describe_source(self, data_cfg: DataConfig) -> str:
        return source_label(self._source(data_cfg), data_cfg.subset)

    def to_example(self, row: dict[str, Any], template: str | None = None) -> Example:
        """A training or evaluation row, in the shape its keys say; bad values raise `FieldError`."""
        shape = shape_of(row)
        return self._conversation(row, shape, checked_template(template, shape), query=False)

    def to_query(self, row: dict[str, Any], template: str | None = None) -> Example:
        """A row to answer: its response (or, in `messages`, a closing assistant turn) may be absent."""
        shape = shape_of(row)
        missing = [f for f in shape.text_fields if f not in row and f != "input"]
        if missing:
            raise FieldError(missing[0], f"a row to predict lacks {missing}; completion rows hold {_shape_list()}")
        return self._conversation(row, shape, checked_template(template, shape), query=True)

    def _source(self, data_cfg: DataConfig) -> str:
        source = resolve_source(self.name, data_cfg, self.default_source, self.default_eval_split)
        if not source:
            raise DataError(
                f"task {self.name!r} has no data of its own: set data.source to a folder or file of "
                f"{_shape_list()} rows",
                hint="e.g. data.source=examples/completion, the example set shipped with heft",
            )
        return source

    def _conversation(
        self, values: Mapping[str, Any], shape: RowShape, template: str | None, query: bool
    ) -> Conversation:
        if shape is MESSAGES:
            turns, response = split_messages(parse_messages(values["messages"]), query)
        else:
            turns = [("user", user_turn(values, shape, template))]
            response = values.get(shape.response_field)
            if response is not None or not query:
                response = _text(shape.response_field, response, "empty response")
        if response is not None and self._answer_re is not None and self.answer(response) is None:
            raise FieldError(
                shape.response_field, f"answer_pattern {self.answer_pattern!r} finds no answer in {response!r}"
            )
        return Conversation(
            prompt=plain_prompt(turns),
            target="" if response is None else " " + response,
            label=-1 if response is None else 0,
            fields=dict(values),
            template=template,
            turns=turns,
            response=response,
            prompt_field=shape.prompt_field,
        )

    # -------------------------------------------------------------------------------- tokenising
    def uses_chat_template(self, tokenizer: Any) -> bool:
        return self.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> tuple[list[EncodedExample], int]:
        """Prompt tokens, then the response's as they follow it and the token that ends it. Nothing is
        cut: an example longer than `max_length` is an error naming its row. Returns (encoded, 0)."""
        if not examples:
            return [], 0
        chat = self.uses_chat_template(tokenizer)
        texts = [self._texts(ex, tokenizer, chat) for ex in examples]
        # a chat template writes the special tokens itself (a BOS among them, if the model wants one)
        prompt_ids = tokenizer([prompt for prompt, _ in texts], add_special_tokens=not chat)["input_ids"]
        answered = [(prompt, target) for prompt, target in texts if target is not None]
        targets = iter(continuation_ids(tokenizer, [p for p, _ in answered], [t for _, t in answered]))
        end = [] if chat else [_eos_id(tokenizer)]  # a chat template closes the turn itself
        encoded = []
        for i, (ex, (_, target), ids) in enumerate(zip(examples, texts, prompt_ids)):
            response_ids = next(targets) + end if target is not None else []
            _check_room(ex, i, len(ids), len(response_ids), max_length)
            encoded.append(EncodedCompletion(ids + response_ids, len(ids), ex.label, False, reference=ex.response))
        return encoded, 0

    def _texts(self, ex: Conversation, tokenizer: Any, chat: bool) -> tuple[str, str | None]:
        """The prompt text and the response text that follows it (None for a row to predict)."""
        if not chat:
            return ex.prompt, (ex.target or None)
        messages = [{"role": role, "content": content} for role, content in ex.turns]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if ex.response is None:
            return prompt, None
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": ex.response}], tokenize=False)
        if not full.startswith(prompt) or ex.response not in full[len(prompt) :]:
            raise ValueError(
                "the tokenizer's chat template does not write a conversation as its prompt followed by the "
                "response; set chat_template: none for the plain layout"
            )
        return prompt, full[len(prompt) :].rstrip()  # up to the token that closes the turn

    def end_token_ids(self, tokenizer: Any) -> list[int]:
        """Tokens that end a response: EOS, and the one a chat template closes the assistant's turn with."""
        ids = {_eos_id(tokenizer)}
        if self.uses_chat_template(tokenizer):
            probe = Conversation("", "", 0, {}, turns=[("user", "Hi")], response="Hello")
            _, target = self._texts(probe, tokenizer, chat=True)
            closing = tokenizer(target[target.rindex("Hello") + len("Hello") :], add_special_tokens=False)
            ids.update(closing["input_ids"][:1])
        return sorted(ids)

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """Strings that end a generated response: `stop`, and in the plain layout the next user turn."""
        return [*self.stop, *([] if self.uses_chat_template(tokenizer) else [PLAIN_STOP])]

    # ----------------------------------------------------------------------------------- scoring
    @staticmethod
    def cut_response(text: str, stop_strings: Sequence[str]) -> str:
        """A generated text up to its first stop string."""
        ends = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        return text[: min(ends)] if ends else text

    def answer(self, text: str) -> str | None:
        """What exact match compares: the stripped, case-folded text, or with `answer_pattern` its last
        match (first group, if any) so normalised; None when the pattern finds nothing."""
        if self._answer_re is None:
            return text.strip().casefold()
        matches = list(self._answer_re.finditer(text))
        if not matches:
            return None
        found = matches[-1].group(1) if self._answer_re.groups else matches[-1].group(0)
        return (found or "").strip().casefold()

    def is_correct(self, generated: str, reference: str) -> bool:
        answer = self.answer(generated)
        return answer is not None and answer == self.answer(reference)


# ------------------------------------------------------------------------------------ row shapes
def _shape_list() -> str:
    return ", ".join(shape.name for shape in SHAPES)


def shape_of(row: Mapping[str, Any]) -> RowShape:
    """The shape a row's keys say: `messages`, else `instruction`, else prompt/response."""
    return MESSAGES if "messages" in row else ALPACA if "instruction" in row else PROMPT


def read_shape(
    source: str, split: str, columns: Mapping[str, str], subset: str | None = None
) -> tuple[RowShape, list[Row]]:
    """The rows of `split` in the first shape whose columns its file has (`columns` renaming them;
    `subset`: a hub dataset's configuration)."""
    known = {f for shape in SHAPES for f in shape.fields}
    unknown = sorted(set(columns) - known)
    if unknown:
        raise DataError(
            f"data.columns maps unknown field(s) {unknown}; completion fields are {sorted(known)}",
            hint="data.columns maps the task's field names (keys) to the file's column names (values)",
        )
    misses = []
    for shape in SHAPES:
        if not set(columns) <= set(shape.fields):  # a mapping names the shape the user means
            continue
        try:
            return shape, read_rows(source, split, shape.fields, columns, subset=subset)
        except MissingColumn as e:
            misses.append(f"{shape.name}: {e}")
    raise DataError(
        f"rows of split {split!r} of {source} fit none of the completion shapes ({_shape_list()}): "
        + "; ".join(misses),
        hint="rename the file's columns with data.columns, e.g. data.columns.prompt=question",
    )


def checked_template(template: str | None, shape: RowShape) -> str | None:
    """A `data.template` override, which renders the user's turn from the row's text fields."""
    if template is None:
        return None
    if shape is MESSAGES:
        raise ValueError("data.template does not apply to messages rows: their turns are the prompt")
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    bad = sorted(names - set(shape.text_fields))
    if bad:
        raise ValueError(f"data.template uses {bad}; with {shape.name} rows it may use {list(shape.text_fields)}")
    return template


def user_turn(values: Mapping[str, Any], shape: RowShape, template: str | None) -> str:
    """The user's turn of a prompt/response or alpaca row."""
    if shape is PROMPT:
        prompt = _text("prompt", values["prompt"], "empty prompt")
        return prompt if template is None else template.format(prompt=prompt)
    instruction = _text("instruction", values["instruction"], "empty instruction")
    given = values.get("input")
    extra = "" if given is None else given
    if not isinstance(extra, str):
        raise FieldError("input", f"expected text, got {type(extra).__name__} {extra!r}")
    if template is not None:
        return template.format(instruction=instruction, input=extra)
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def parse_messages(value: Any) -> list[tuple[str, str]]:
    """A `messages` cell (a list of {role, content}, or that list as JSON text) as (role, content) pairs."""
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells hold lists as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise FieldError("messages", f"invalid JSON list ({e.msg})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise FieldError("messages", f"expected a non-empty list of {{role, content}} turns, got {value!r:.80}")
    turns = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, Mapping) or not {"role", "content"} <= set(turn):
            raise FieldError("messages", f"turn {i} is {turn!r:.80}, not an object with role and content")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise FieldError("messages", f"turn {i} has unknown role {role!r}; roles are {list(ROLES)}")
        problem = "empty response" if role == "assistant" and i == len(value) else f"turn {i}: empty content"
        turns.append((role, _text("messages", content, problem)))
    return turns


def split_messages(turns: list[tuple[str, str]], query: bool) -> tuple[list[tuple[str, str]], str | None]:
    """The turns before the response, and the response: the last turn, which must be the assistant's
    (a row to predict may end in a user turn instead: it has no response)."""
    roles = [role for role, _ in turns]
    if roles[-1] == "assistant":
        history, response = turns[:-1], turns[-1][1]
    elif query:
        history, response = turns, None
    elif "assistant" not in roles:
        raise FieldError("messages", "no assistant turn: the last assistant turn is the response to learn")
    else:
        raise FieldError(
            "messages", f"the conversation ends in a {roles[-1]!r} turn after its last assistant turn, the response"
        )
    if "user" not in (role for role, _ in history):
        raise FieldError("messages", "no user turn before the response")
    return history, response


def plain_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """The plain layout: one `Role: content` line per turn, then `Assistant:` (the response follows after a space)."""
    return "".join(f"{ROLES[role]}: {content}\n" for role, content in turns) + "Assistant:"


def _text(name: str, value: Any, empty: str) -> str:
    if not isinstance(value, str):
        raise FieldError(name, f"expected text, got {type(value).__name__} {value!r:.80}")
    if not value.strip():
        raise FieldError(name, empty)
    return value


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("completion needs a tokenizer with an end-of-sequence token, to end responses")
    return tokenizer.eos_token_id


def _check_room(ex: Conversation, index: int, prompt_len: int, response_len: int, max_length: int) -> None:
    """A prompt must leave room for its response (or, for a row to predict, one generated token)."""
    if prompt_len + max(response_len, 1) <= max_length:
        return
    where = f"{ex.origin}: field {ex.prompt_field!r}" if ex.origin else f"row {index + 1}: field {ex.prompt_field!r}"
    needs = f"and its response {response_len} (with its end token)" if response_len else "and a response at least 1"
    raise DataError(
        f"{where}: the prompt takes {prompt_len} tokens {needs}, over max_length {max_length}; "
        "completion examples are never cut",
        hint="raise max_length, or shorten or remove the row",
    )
