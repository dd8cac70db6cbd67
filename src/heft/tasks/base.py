"""A task is data + prompt + metric (as in lm-evaluation-harness): rows become prompts whose gold
continuation is one of the example's choices. Two scorings share this interface: `first_token`
compares the choices' first tokens at the last prompt position (BoolQ's " yes"/" no"), and
`continuation` sums the log-probabilities of each choice's whole continuation (phrase answers)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from heft.config import DataConfig
from heft.config_loader import OptionError
from heft.tasks.data import (
    DataError,
    FieldError,
    HubDefault,
    parse_rows,
    pick_eval_split,
    read_rows,
    resolve_source,
    source_label,
    subsample,
)

log = logging.getLogger("heft")

_ANNOUNCED_HUB_COPIES: set[str] = set()
"""Tasks whose reading of a hub copy instead of their absent local folder was logged (once per process)."""

EVAL_SPLITS = ("validation", "test")
"""Splits a local folder is evaluated on, in this order, when it lacks the task's default one."""


@dataclass
class Example:
    """One rendered example."""

    prompt: str
    target: str
    """Gold continuation, e.g. " yes" (`choices[label]`)."""
    label: int
    """Index into the task's `choices`."""
    fields: dict[str, Any]
    """Raw field values, kept for predictions output and for re-rendering a truncated prompt."""
    template: str | None = None
    """Template the prompt was rendered with (a `data.template` override); None: the task's."""
    choices: list[str] = field(default_factory=list)
    """Every continuation of this example, gold one at `label` (the task's fixed `choices`, or the row's)."""


@dataclass
class EncodedExample:
    """Token ids ready for training and scoring."""

    input_ids: list[int]
    """Prompt tokens followed by target tokens."""
    prompt_len: int
    """Number of prompt tokens; the target starts here."""
    label: int
    truncated: bool
    """True when the truncate field was shortened to fit `max_length`."""
    choice_ids: list[list[int]] = field(default_factory=list)
    """Tokens of every continuation (continuation scoring only; empty for first-token tasks)."""
    choice_chars: list[int] = field(default_factory=list)
    """Characters of every choice without its leading delimiter: lm-eval's `acc_norm` divisor."""


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def continuation_ids(tokenizer: Any, contexts: Sequence[str], texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as it tokenises after its context, split as lm-evaluation-harness does:
    tokenise context + text and drop the context's tokens. Tokenising the text alone can differ:
    Llama-2's tokenizer makes " yes" alone ['▁', '▁yes'], but ['▁yes'] after "Answer:". Where context
    and text merge across the boundary (the context's tokens are no prefix), the text's own tokens are used.
    Each distinct context and (context, text) pair is tokenised once: a question's choices share its
    prompt, and its gold answer is one of them."""
    pairs = list(zip(contexts, texts, strict=True))
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    distinct_contexts = list(dict.fromkeys(context for context, _ in unique))
    heads = dict(zip(distinct_contexts, tokenizer(distinct_contexts, add_special_tokens=False)["input_ids"]))
    joint = tokenizer([context + text for context, text in unique], add_special_tokens=False)["input_ids"]
    split = {}
    for (context, text), ids in zip(unique, joint):
        head = heads[context]
        split[context, text] = (
            ids[len(head) :] if ids[: len(head)] == head else tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    return [split[pair] for pair in pairs]


def first_token_ids(tokenizer: Any, choices: Sequence[str], context: str = "") -> list[int]:
    """First token id of each choice after `context` (a prompt, or one that ends like the prompts),
    which single-token scoring compares; they must differ."""
    ids = continuation_ids(tokenizer, [context] * len(choices), choices)
    if not all(ids):
        raise ValueError(f"a choice of {list(choices)} tokenises to nothing")
    first = [t[0] for t in ids]
    if len(set(first)) != len(first):
        raise ValueError(f"choices {list(choices)} share a first token ({first}); scoring needs distinct ones")
    return first


@functools.cache  # asked for every row (a task's fields come from its template)
def template_fields(template: str, reserved: tuple[str | None, ...] = (), option: str = "template") -> tuple[str, ...]:
    """The fields a prompt template names, in order. A template that cannot render a row (bad braces,
    positional or indexed names, no field at all, or a `reserved` field that holds the answer) raises
    `OptionError` naming `option`."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise OptionError(
            option, f"not a template ({e}); write fields as {{name}} and braces as {{{{ and }}}}"
        ) from None
    if bad := [name for name in names if not name.isidentifier()]:
        raise OptionError(option, f"it names {bad[0]!r}; fields are plain names such as {{question}}")
    if leaked := [name for name in names if name in reserved]:
        raise OptionError(option, f"it names {leaked[0]!r}, the field that holds the answer; a prompt may not show it")
    if not names:
        raise OptionError(option, "it names no field of the row; a prompt shows at least one, e.g. {question}")
    return tuple(dict.fromkeys(names))


class Task:
    """Base class of the task kinds. A kind is a subclass (a row shape and a scoring) whose settings
    come from `Options`, a dataclass that a config's `task: {kind: ..., <option>: ...}` fills in; a
    preset such as boolq is an instance with a benchmark's options, data source and evaluation split."""

    kind: str = ""
    """Registry name of the kind, as a config's `task: {kind: ...}` names it."""
    Options: type | None = None
    """Dataclass of the settings a config may give (its `name`, `template`, ...); each one becomes an
    attribute of the instance. None: a kind configured by its class attributes alone."""
    name: str
    label_field: str
    template: str
    """`str.format` template over the text fields; it names them (all fields but the label and choices)."""
    choices: Sequence[str] = ()
    """Fixed continuations; label i is `choices[i]`. Empty when each row brings its own (`choices_field`)."""
    choices_field: str | None = None
    """Field holding each row's list of answer phrases; None: every row shares `choices`."""
    aliases: Mapping[str, int] = {}
    """Extra words (lower case) accepted as labels in data and generations, e.g. {"true": 1}."""
    truncate_field: str | None = None
    """Field shortened (from its end) when an example is longer than `max_length`; None: too long is an error."""
    default_source: str | None = None
    """Hub dataset id (or local path) used when no data is configured; None: `data.source` must say."""
    hub_default: HubDefault | None = None
    """A local `default_source`'s copy on the hub, read when that folder is absent."""
    default_eval_split: str = "validation"
    """Split evaluated when the config leaves `data.eval_split` unset and the data has it."""
    scoring: Literal["first_token", "continuation"] = "first_token"
    """`first_token`: the choices' first-token log-probabilities at the last prompt position (their
    first tokens must differ); `continuation`: the log-likelihood of each whole continuation."""
    headline: Literal["acc", "acc_norm"] = "acc"
    """Which score decides `accuracy` in evaluations (continuation tasks report `acc` and `acc_norm`)."""
    choice_delimiter: str = ""
    """Text that starts every continuation (lm-eval's target delimiter); not counted in `acc_norm`'s length."""
    metric = staticmethod(accuracy)

    def __init__(
        self,
        options: Any = None,
        default_source: str | None = None,
        default_eval_split: str | None = None,
        hub_default: HubDefault | None = None,
    ) -> None:
        """Settings from `options` (default: the kind's defaults); a preset also names its data."""
        if self.Options is not None:
            options = self.Options() if options is None else options
            for f in dataclasses.fields(options):
                setattr(self, f.name, getattr(options, f.name))
        if default_source is not None:
            self.default_source = default_source
        if default_eval_split is not None:
            self.default_eval_split = default_eval_split
        if hub_default is not None:
            self.hub_default = hub_default

    @property
    def fields(self) -> tuple[str, ...]:
        """Raw fields of a row: those the template names, then the choices and the label."""
        return (*template_fields(self.template), *filter(None, [self.choices_field]), self.label_field)

    @property
    def text_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.fields if f not in (self.label_field, self.choices_field))

    def load_split(
        self, data_cfg: DataConfig, split: str, max_examples: int | None = None, seed: int = 0
    ) -> list[Example]:
        """Read, validate and render a split; `max_examples` takes a stratified subsample."""
        try:
            self.check_template(data_cfg.template)
        except OptionError as e:
            raise ValueError(f"data.template: {e}") from None
        data, hub_copy = self._resolved(data_cfg)
        if hub_copy:
            self._announce_hub_copy(data)
        try:
            rows = read_rows(data.source, split, self.fields, data.columns, self._named_by(data_cfg), data.subset)
        except DataError as e:
            if not hub_copy:
                raise
            raise DataError(f"{self.default_source} does not exist (from {Path.cwd()}), and {e}", e.hint) from e
        examples = parse_rows(rows, lambda row: self.to_example(row, data_cfg.template))
        if max_examples is not None:
            examples = subsample(examples, max_examples, seed)
        if not examples:
            raise DataError(f"{rows[0].file}: split {split!r} is empty after max_examples={max_examples}")
        return examples

    def data_source(self, data_cfg: DataConfig) -> DataConfig:
        """`data_cfg` with the source `load_split` reads (see `_resolved`)."""
        return self._resolved(data_cfg)[0]

    def _resolved(self, data_cfg: DataConfig) -> tuple[DataConfig, bool]:
        """(`data_cfg` with its source resolved, whether that is the task's hub copy). The hub copy, with
        its subset and columns (`data.subset` and `data.columns` still override), replaces the task's local
        default folder where the config leads there (no `data.source`, no match under `$HEFT_DATA_DIR`)
        and that folder is absent."""
        source = resolve_source(self.name, data_cfg, self.default_source, self.default_eval_split)
        hub = self.hub_default
        if hub is None or data_cfg.source or source != self.default_source or Path(source).expanduser().exists():
            return dataclasses.replace(data_cfg, source=source), False
        copy = dataclasses.replace(
            data_cfg,
            source=hub.dataset,
            subset=data_cfg.subset or hub.subset,
            columns={**hub.columns, **data_cfg.columns},
        )
        return copy, True

    def _announce_hub_copy(self, data: DataConfig) -> None:
        """Warn, once per task and process, that its hub copy stands in for its absent local folder."""
        if self.name in _ANNOUNCED_HUB_COPIES:
            return
        _ANNOUNCED_HUB_COPIES.add(self.name)
        log.warning(
            "%s: no %s from here (%s); reading its hub original %s instead",
            self.name,
            self.default_source,
            Path.cwd(),
            source_label(data.source, data.subset),
        )

    def describe_source(self, data_cfg: DataConfig) -> str:
        """Where `load_split` reads from (absolute local path, or `hub:<id> (<subset>)`), for run records."""
        data = self.data_source(data_cfg)
        return source_label(data.source, data.subset)

    def eval_split(self, data_cfg: DataConfig) -> str:
        """The split evaluated: `data.eval_split`; else the task's default, or the first of validation and
        test, that a local folder holds; else its training split (`read_splits` holds examples out of it).
        A single file or a hub dataset takes the task's default."""
        if data_cfg.eval_split is not None:
            return data_cfg.eval_split
        source = self.data_source(data_cfg).source
        return pick_eval_split(source, (self.default_eval_split, *EVAL_SPLITS), data_cfg.train_split)

    def _named_by(self, data_cfg: DataConfig) -> dict[str, str]:
        """For messages about a missing column: the config key whose template names each field, where a
        config wrote that template (a preset's own template is no key to fix)."""
        named = {}
        if self.Options is not None and self.template != getattr(self.Options(), "template", self.template):
            named = dict.fromkeys(self.text_fields, "task.template")
        if data_cfg.template is not None:
            named |= dict.fromkeys(template_fields(data_cfg.template), "data.template")
        return named

    def to_example(self, row: dict[str, Any], template: str | None = None) -> Example:
        """Render one row (task field -> raw value); bad values raise `FieldError`."""
        text_fields = self.text_fields
        for name in text_fields:
            value = row[name]
            if not isinstance(value, str):
                raise FieldError(name, f"expected text, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise FieldError(name, "empty text")
        choices = self.row_choices(row)
        label = self.parse_label(row[self.label_field], len(choices))
        text = {name: row[name] for name in text_fields}
        return Example(
            prompt=(template or self.template).format(**text),
            target=choices[label],
            label=label,
            fields=dict(row),
            template=template,
            choices=choices,
        )

    def row_choices(self, row: dict[str, Any]) -> list[str]:
        """The continuations a row is scored on: the task's fixed `choices` here."""
        return list(self.choices)

    def to_query(self, row: dict[str, Any], template: str | None = None) -> Example:
        """Render a row to predict; its label field may be absent, in which case `label` is -1."""
        needed = [f for f in self.fields if f != self.label_field]
        missing = [f for f in needed if f not in row]
        if missing:
            raise FieldError(
                missing[0],
                f"a row to predict lacks {missing}; task {self.name!r} needs {needed} "
                f"(and optionally {self.label_field!r})",
            )
        if row.get(self.label_field) is not None:
            return self.to_example(row, template)
        example = self.to_example({**row, self.label_field: 0}, template)
        example.label, example.fields = -1, dict(row)
        return example

    def parse_label(self, value: Any, num_choices: int | None = None) -> int:
        """Label index from a bool (two-choice tasks), an int index, or a word/number as text
        (`num_choices` is the row's count; fixed-choice tasks know theirs)."""
        if isinstance(value, bool) and len(self.choices) == 2:
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.choices):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            if word.isdecimal() and int(word) < len(self.choices):
                return int(word)
            if word in self._label_words:
                return self._label_words[word]
        accepted = sorted(self._label_words) + [str(i) for i in range(len(self.choices))]
        raise FieldError(self.label_field, f"cannot parse label {value!r}; expected one of {accepted}")

    def parse_generation(self, text: str) -> int | None:
        """Label of a free-form generation from its first word (e.g. "Yes." -> 1), else None."""
        words = text.split(maxsplit=1)
        return self._label_words.get(words[0].strip(string.punctuation).lower()) if words else None

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> tuple[list[EncodedExample], int]:
        """Tokenise the prompt (with the tokenizer's special tokens), then the target as it tokenises
        after it (`continuation_ids`); continuation tasks also tokenise every choice so, and the prompt must leave room
        for the longest one (so training and scoring see the same prompt). Too-long examples lose
        the end of `truncate_field` only, so the question and the answer slot survive. Returns the
        encoded examples and how many were truncated."""
        if not examples:
            return [], 0
        prompts = tokenizer([ex.prompt for ex in examples])["input_ids"]
        by_choice = self.scoring == "continuation"
        # each example's target, then its choices (continuation scoring), tokenised after its prompt
        texts = [(ex.prompt, text) for ex in examples for text in [ex.target, *(ex.choices if by_choice else ())]]
        piece_ids = continuation_ids(tokenizer, [prompt for prompt, _ in texts], [text for _, text in texts])
        empty = sorted({text for (_, text), ids in zip(texts, piece_ids) if not ids})
        if empty:
            raise ValueError(f"continuation(s) {empty} tokenise to nothing")
        pieces = iter(piece_ids)
        first_ids = None if by_choice else self.choice_token_ids(tokenizer)
        encoded, n_truncated = [], 0
        for i, (ex, prompt_ids) in enumerate(zip(examples, prompts)):
            target_ids = next(pieces)
            choice_ids = [next(pieces) for _ in ex.choices] if by_choice else []
            if first_ids is not None and ex.label >= 0 and target_ids[0] != first_ids[ex.label]:  # -1: a query
                raise ValueError(
                    f"example {i}: after its prompt the answer {ex.target!r} starts with token {target_ids[0]}, "
                    f"not {first_ids[ex.label]}, the one scoring compares; end data.template as {self.template!r} ends"
                )
            room = max(len(ids) for ids in [target_ids, *choice_ids])
            truncated = len(prompt_ids) + room > max_length
            if truncated:
                prompt_ids = self._truncated_prompt(ex, i, prompt_ids, tokenizer, max_length - room)
                n_truncated += 1
            chars = [len(c) - len(self.choice_delimiter) for c in ex.choices] if by_choice else []
            encoded.append(
                EncodedExample(prompt_ids + target_ids, len(prompt_ids), ex.label, truncated, choice_ids, chars)
            )
        return encoded, n_truncated

    def choice_token_ids(self, tokenizer: Any) -> list[int]:
        """First token id of each choice after a prompt of this task: the logits compared when scoring."""
        return first_token_ids(tokenizer, self.choices, self.template.format(**dict.fromkeys(self.text_fields, "text")))

    @property
    def _label_words(self) -> dict[str, int]:
        return {**{c.strip().lower(): i for i, c in enumerate(self.choices)}, **self.aliases}

    def check_template(self, template: str | None) -> None:
        """Refuse a template override (`data.template`) that names no field, a field the task does not
        read, or the answer, with an `OptionError`."""
        if template is None:
            return
        names = template_fields(template, reserved=(self.label_field, self.choices_field))
        if unknown := [name for name in names if name not in self.text_fields]:
            raise OptionError("template", f"it uses {unknown}; it may only use the fields {list(self.text_fields)}")

    def _truncated_prompt(
        self, ex: Example, index: int, prompt_ids: list[int], tokenizer: Any, budget: int
    ) -> list[int]:
        """Cut tokens off the end of the truncate field until the prompt fits `budget` tokens.

        The field is tokenised once; each try drops as many field tokens as the prompt is over
        budget (tokenisation is nearly additive), so one or two re-tokenisations usually suffice.
        """
        if self.truncate_field is None:
            raise ValueError(
                f"example {index} ({ex.prompt[:60]!r}…) needs {len(prompt_ids)} prompt tokens, over the {budget} "
                "that max_length leaves beside its longest choice; raise max_length"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("truncating examples needs a fast tokenizer (for offset mappings)")
        text = ex.fields[self.truncate_field]
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        keep, excess = len(offsets), len(prompt_ids) - budget
        while excess > 0:
            if keep == 0:
                kept = {n: ex.fields[n] for n in self.text_fields if n != self.truncate_field}
                raise ValueError(
                    f"example {index} {kept} needs {len(prompt_ids)} prompt tokens even with an empty "
                    f"{self.truncate_field!r}, over the {budget} that max_length leaves; raise max_length"
                )
            keep = max(0, keep - excess)
            cut = text[: offsets[keep - 1][1]].rstrip() if keep else ""
            prompt = (ex.template or self.template).format(
                **{name: ex.fields[name] for name in self.text_fields} | {self.truncate_field: cut}
            )
            prompt_ids = tokenizer(prompt)["input_ids"]
            excess = len(prompt_ids) - budget
        return prompt_ids
