"""Run configuration: plain dataclasses, filled from YAML files, dicts and key=value overrides."""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import functools
import inspect
import re
import reprlib
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heft.methods.lora.config import LoraConfig
from heft.methods.reft.config import ReftConfig, parse_positions
from heft.quantize import BACKENDS, BITS, COMPUTE_DTYPES, QUANT_TYPES, REFUSED_BACKENDS, QuantizeConfig
from heft.quantize import device_type as quantize_device_type
from heft.quantize import problems as quantize_problems

METHODS = ("lora", "dora", "loreft", "direft", "joint")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass
class StageConfig:
    """One level of the hierarchy: a PEFT method and the optimisation that trains it."""

    method: str = "lora"
    """One of lora, dora (weight space, via peft), loreft, direft (representation space),
    joint (a LoRA adapter and ReFT interventions trained together in one stage)."""
    name: str | None = None
    """Label used in logs and the run folder; defaults to `<index>-<method>`."""
    epochs: float = 1.0
    """Passes over the training set. Fractions are allowed (0.5 = half an epoch)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    schedule: str = "linear"
    """Learning-rate decay after warmup: linear, cosine or constant."""
    warmup_ratio: float = 0.0
    """Fraction of the stage's optimizer steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings, used by lora, dora and joint."""
    reft: ReftConfig = field(default_factory=ReftConfig)
    """Intervention settings, used by loreft, direft and joint."""
    keep: str = "always"
    """`if_better`: roll the stage back when it lowers accuracy on the dev split (`data.dev_examples`)."""

    def __post_init__(self) -> None:
        # the method name implies the variant, whether the config came from YAML or from Python
        # (copies, so that a settings object shared by several stages is not changed under them)
        if self.method == "dora" and not self.lora.use_dora:
            self.lora = dataclasses.replace(self.lora, use_dora=True)
        elif self.method in ("loreft", "direft") and self.reft.kind != self.method:
            self.reft = dataclasses.replace(self.reft, kind=self.method)

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "dora", "joint")

    @property
    def uses_reft(self) -> bool:
        return self.method in ("loreft", "direft", "joint")

    @property
    def starts_as_identity(self) -> bool:
        """Whether the freshly added stage leaves the model's function unchanged (peft's LoRA and
        DoRA start with B = 0; ReFT with `init: identity`)."""
        return not self.uses_reft or self.reft.init == "identity"


@dataclass
class DataConfig:
    """Where a task's examples come from."""

    source: str | None = None
    """Hub dataset id (e.g. google/boolq) or a local folder/file. None: the task's default,
    or `$HEFT_DATA_DIR/<task>` when that variable is set."""
    train_split: str = "train"
    """Split (or file stem inside a local folder) used for training."""
    eval_split: str | None = None
    """Split used for evaluation; None: the task's (validation for BoolQ, test for ARC and OpenBookQA)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map from the task's field names to the file's column names, e.g. {question: query}."""
    template: str | None = None
    """Prompt template overriding the task default (Python format string over the fields)."""
    dev_examples: int | None = None
    """Stratified dev split carved out of the *training* split (never the evaluation split) before
    `max_train_examples` is drawn; stages with `keep: if_better` are judged on it."""


@dataclass
class RunConfig:
    """Everything a `heft train` run needs; serialised into the run folder as `config.yaml`."""

    model: str = "smollm2-135m"
    """Hugging Face hub id, local folder, or the offline alias smollm2-135m."""
    dtype: str = "float32"
    """Weights dtype: float32 or bfloat16 (with `quantize`: of the layers left unquantized, e.g. embeddings)."""
    quantize: QuantizeConfig | None = None
    """Load the frozen base quantized, e.g. `{bits: 4}` (QLoRA); None: in `dtype`. See `quantize.*` below."""
    task: str = "boolq"
    """Registered task name."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source and column mapping."""
    max_length: int = 256
    """Tokens per example (prompt + target); longer passages are truncated."""
    max_train_examples: int | None = None
    """Stratified subsample of the training split (fixed seed); None uses all."""
    max_eval_examples: int | None = None
    """Stratified subsample of the evaluation split; None uses all."""
    seed: int = 42
    """Seeds data order, subsampling and parameter initialisation."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping threshold; None disables clipping."""
    bf16: bool = False
    """Autocast forward passes to bfloat16 (weights stay in `dtype`)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: about a third more
    compute for a fraction of the activation memory (batches of 64 × 512 on a GPU)."""
    compile: str | None = None
    """`torch.compile` the decoder layers for training (evaluation stays eager): default,
    reduce-overhead (CUDA graphs) or max-autotune-no-cudagraphs; None trains eagerly. The first
    steps pay the compilation (tens of seconds); dropout masks differ from eager ones."""
    eval_batch_size: int = 16
    """Examples per evaluation batch."""
    eval_every: str | int = "epoch"
    """When to evaluate during training: epoch, stage, never, or N: every N-th epoch of each stage and
    where it ends (long runs on a slow machine, where evaluation would cost as much as training)."""
    eval_zero_shot: bool = True
    """Evaluate the untrained model before the first stage."""
    boundary_examples: int = 64
    """The first N training examples whose mean loss (eval mode) is recorded when each stage starts
    and ends, so a jump at a stage boundary shows in `metrics.jsonl`; 0 turns it off."""
    output_dir: str = "runs/{task}-{time}"
    """Run folder; `{task}`, `{model}` and `{time}` are filled in."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    """The hierarchy, trained in order; each stage freezes everything before it."""

    def __post_init__(self) -> None:
        self.stages = [resolve_merge(stage, self.quantize is not None) for stage in self.stages]
        if self.data.eval_split is None:  # the task's own evaluation split (test for ARC, validation for BoolQ)
            from heft.tasks import get_task  # here: the tasks module imports this one

            with contextlib.suppress(ValueError):  # an unknown task is reported by _finish, with its line
                self.data.eval_split = get_task(self.task).default_eval_split


# --------------------------------------------------------------------------- loading & validation

Key = tuple[str | int, ...]
"""A dotted field path as parts, e.g. ("stages", 0, "epochs")."""


class ConfigError(ValueError):
    """A bad config, reported as one line naming the file and line (or override), field and a fix."""


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


_POSITIVE = (lambda v: v > 0, "a value > 0")
_FRACTION = (lambda v: 0 <= v < 1, "a value in [0, 1)")


def is_eval_interval(value: Any) -> bool:
    """An `eval_every` that evaluates during training: epoch, stage or a number of epochs > 0."""
    return value in ("epoch", "stage") or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


def _parses(parse: Callable[[Any], Any], value: Any) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


_LAYER_RANGE = re.compile(r"all|\d+:\d+(:[1-9]\d*)?")

# Constraints the annotations cannot express, keyed by (dataclass, field); None values skip them.
_CHECKS: dict[tuple[type, str], tuple[Callable[[Any], bool], str]] = {
    (RunConfig, "dtype"): _one_of("float32", "bfloat16"),
    (RunConfig, "eval_every"): (
        lambda v: v == "never" or is_eval_interval(v),
        "one of epoch, stage, never, or a number of epochs > 0",
    ),
    (RunConfig, "compile"): _one_of(*COMPILE_MODES),
    **{
        (RunConfig, k): _POSITIVE
        for k in (
            "max_length",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "max_train_examples",
            "max_eval_examples",
            "max_grad_norm",
        )
    },
    (RunConfig, "stages"): (bool, "at least one stage"),
    (StageConfig, "method"): _one_of(*METHODS),
    (StageConfig, "schedule"): _one_of("linear", "cosine", "constant"),
    (StageConfig, "keep"): _one_of("always", "if_better"),
    (DataConfig, "dev_examples"): _POSITIVE,
    (RunConfig, "boundary_examples"): (lambda v: v >= 0, "a value >= 0"),
    (StageConfig, "epochs"): _POSITIVE,
    (StageConfig, "lr"): _POSITIVE,
    (StageConfig, "warmup_ratio"): _FRACTION,
    (StageConfig, "weight_decay"): (lambda v: v >= 0, "a value >= 0"),
    (LoraConfig, "r"): _POSITIVE,
    (LoraConfig, "dropout"): _FRACTION,
    (QuantizeConfig, "bits"): (lambda v: v in BITS, "4 or 8"),
    (QuantizeConfig, "backend"): _one_of(*BACKENDS, *REFUSED_BACKENDS),
    (QuantizeConfig, "quant_type"): _one_of(*QUANT_TYPES),
    (QuantizeConfig, "compute_dtype"): _one_of(*COMPUTE_DTYPES),
    (ReftConfig, "kind"): _one_of("loreft", "direft"),
    (ReftConfig, "rank"): _POSITIVE,
    (ReftConfig, "dropout"): _FRACTION,
    (ReftConfig, "init"): _one_of("identity", "random"),
    (ReftConfig, "positions"): (lambda v: _parses(parse_positions, v), "f<k>, l<k> or f<k>+l<k>, e.g. f7+l7"),
    (ReftConfig, "layers"): (
        lambda v: isinstance(v, list) or bool(_LAYER_RANGE.fullmatch(v)),
        "all, a list of indices, or start:stop[:step]",
    ),
}


def _dotted(key: Key) -> str:
    return ".".join(map(str, key)) or "(top level)"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


@dataclass
class Source:
    """Where values came from, so errors can point at a YAML line or the override that set them."""

    name: str
    node: yaml.Node | None = None
    overrides: list[tuple[Key, str]] = field(default_factory=list)

    def where(self, key: Key) -> str:
        for okey, text in reversed(self.overrides):
            n = min(len(okey), len(key))
            if okey[:n] == key[:n]:
                return f"override '{text}'"
        return f"{self.name} line {_line(self.node, key)}" if self.node is not None else self.name

    def fail(self, problem: str, key: Key, expected: str = "", hint: str = "") -> typing.NoReturn:
        msg = f"{problem} in {self.where(key)}" + (f": expected {expected}" if expected else "")
        raise ConfigError(msg + (f"; {hint}" if hint else ""))


def _line(node: yaml.Node, key: Key) -> int:
    """1-based line of the deepest part of `key` present in the YAML node tree."""
    line = node.start_mark.line
    for part in key:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return line + 1


def _type_name(tp: Any) -> str:
    """`list[StageConfig]` rather than `list[heft.config.StageConfig]`, for messages and docs."""
    name = tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp)
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", name)


def _convert(tp: Any, value: Any, key: Key, src: Source, hint: str) -> Any:
    """Check `value` against annotation `tp` (building nested dataclasses) or fail naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src)
    if origin in (types.UnionType, typing.Union):
        nested = [arg for arg in args if dataclasses.is_dataclass(arg)]
        if nested and isinstance(value, dict):  # e.g. `quantize`: its own errors name the inner key
            return _build(nested[0], value, key, src)
        for arg in args:
            try:
                return _convert(arg, value, key, src, hint)
            except ConfigError:
                pass
    elif origin is list and isinstance(value, list):
        return [_convert(args[0], v, (*key, i), src, hint) for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {
            _convert(args[0], k, key, src, hint): _convert(args[1], v, (*key, k), src, hint) for k, v in value.items()
        }
    elif (
        (tp is type(None) and value is None)
        or (tp in (bool, str) and isinstance(value, tp))
        or tp is int
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return value
    elif tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # strings too: PyYAML reads `3e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    src.fail(f"bad value {reprlib.repr(value)} for '{_dotted(key)}'", key, _type_name(tp), hint)


def _build(cls: type, value: Any, key: Key, src: Source) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and out-of-range values."""
    if not isinstance(value, dict):
        src.fail(f"bad value {reprlib.repr(value)} for '{_dotted(key)}'", key, f"a mapping of {cls.__name__} keys")
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, v in value.items():
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(names)
            src.fail(f"unknown key '{_dotted((*key, name))}'", (*key, name), hint=hint)
        kwargs[name] = _convert(hints[name], v, (*key, name), src, "hint: " + _one_line(docs.get(name)))
    obj = cls(**kwargs)
    for name in names:
        check, expected = _CHECKS.get((cls, name), (None, ""))
        v = getattr(obj, name)
        if check is not None and v is not None and not check(v):
            src.fail(
                f"bad value {reprlib.repr(v)} for '{_dotted((*key, name))}'",
                (*key, name),
                expected,
                "hint: " + _one_line(docs.get(name)),
            )
    return obj


def apply_override(data: dict, text: str, defaults: dict, src: Source) -> None:
    """Set one dotted `key=value` in `data`, creating missing parents from `defaults`."""
    dotted, sep, raw = text.partition("=")
    if not sep or not dotted.strip():
        raise ConfigError(f"bad override '{text}': expected key=value, e.g. stages.0.epochs=3")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. a prompt template such as `Q: {question}`: keep it verbatim
        value = raw
    names, parts, node = dotted.strip().split("."), [], data
    for i, part in enumerate(names):
        if isinstance(node, list):
            if not (part.isdecimal() and int(part) < len(node)):
                raise ConfigError(
                    f"bad index '{part}' for '{_dotted(tuple(parts))}' in override '{text}': "
                    f"expected 0..{len(node) - 1} (it has {len(node)} items)"
                )
            part = int(part)
            defaults = defaults[part] if isinstance(defaults, list) and part < len(defaults) else None
        elif isinstance(node, dict):
            defaults = defaults.get(part) if isinstance(defaults, dict) else None
            if part not in node:
                node[part] = copy.deepcopy(defaults) if isinstance(defaults, (dict, list)) else {}
        else:
            raise ConfigError(
                f"bad override '{text}': '{_dotted(tuple(parts))}' is {reprlib.repr(node)}, not a mapping or list"
            )
        parts.append(part)
        if i == len(names) - 1:
            node[part] = value
        node = node[part]
    src.overrides.append((tuple(parts), text))


MERGE_ON_QUANTIZED_BASE = False
"""What `lora.merge: null` means on a quantized base: the choice that lost less (docs/results/quantized/)."""


def resolve_merge(stage: StageConfig, quantized: bool) -> StageConfig:
    """The stage with `lora.merge` decided: an unset one merges on a full-precision base only."""
    if stage.lora.merge is not None:
        return stage
    merge = MERGE_ON_QUANTIZED_BASE if quantized else True
    return dataclasses.replace(stage, lora=dataclasses.replace(stage.lora, merge=merge))


def blocked_merge(stages: Sequence[StageConfig], earlier_unmerged: bool = False) -> int | None:
    """Index of the first LoRA stage that would merge while an earlier adapter stays unmerged, or None:
    peft merges adapters all together or in order, so such a stage fails only when it finishes."""
    unmerged = earlier_unmerged
    for i, stage in enumerate(stages):
        if stage.uses_lora and stage.lora.merge and unmerged:
            return i
        unmerged |= stage.uses_lora and not stage.lora.merge
    return None


def _finish(data: Any, src: Source, overrides: Sequence[str]) -> RunConfig:
    data = copy.deepcopy(data)
    if not isinstance(data, dict):
        _build(RunConfig, data, (), src)  # reports the bad top level before overrides touch it
    defaults = config_to_dict(RunConfig())
    for text in overrides:
        apply_override(data, text, defaults, src)
    cfg = _build(RunConfig, data, (), src)
    blocked = blocked_merge(cfg.stages)
    if blocked is not None:
        unmerged = next(i for i, s in enumerate(cfg.stages) if s.uses_lora and not s.lora.merge)
        src.fail(
            f"LoRA stage {blocked} cannot merge while stage {unmerged}'s adapter stays unmerged",
            ("stages", blocked, "lora", "merge"),
            hint=f"set lora.merge: false here too, or lora.merge: true on stage {unmerged}",
        )
    if cfg.quantize is not None:
        merging = [i for i, s in enumerate(cfg.stages) if s.uses_lora and s.lora.merge]
        dora = [i for i, s in enumerate(cfg.stages) if s.uses_lora and s.lora.use_dora]
        for problem in quantize_problems(cfg.quantize, quantize_device_type(), merging, dora):
            src.fail(f"'{_dotted(problem.key)}': {problem.problem}", problem.key, hint=problem.hint)
    for i, stage in enumerate(cfg.stages):
        if stage.keep == "if_better" and cfg.data.dev_examples is None:
            src.fail(
                "'keep: if_better' needs a dev split",
                ("stages", i, "keep"),
                hint="set data.dev_examples (e.g. 200), carved out of the training split",
            )
    if cfg.data.eval_split is None:  # __post_init__ leaves it unset only for an unknown task
        from heft.tasks import get_task

        try:
            get_task(cfg.task)
        except ValueError as e:
            src.fail(str(e), ("task",))
    if cfg.data.eval_split == cfg.data.train_split and cfg.max_eval_examples is None:
        src.fail(
            "evaluating on the training split needs max_eval_examples",
            ("max_eval_examples",),
            hint="the evaluation examples are held out of training, so their number must be set",
        )
    return cfg


def config_from_dict(d: dict, source: str = "<dict>") -> RunConfig:
    """Build and validate a RunConfig from plain data (the Python API); `source` names it in errors."""
    return _finish(d, Source(source), ())


def read_yaml(path: str | Path) -> tuple[Any, yaml.Node | None]:
    """Data and node tree of a YAML file; the nodes let errors name the line of a field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    loader = yaml.SafeLoader(text)
    try:  # compose first, so that error messages can map field paths to line numbers
        node = loader.get_single_node()
        data = {} if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        problem = _one_line(getattr(e, "problem", None) or str(e))
        if (ctx := getattr(e, "context_mark", None)) and getattr(e, "context", None):
            problem += f" ({e.context} started on line {ctx.line + 1})"
        raise ConfigError(f"invalid YAML in {where}: {problem}; hint: check indentation, colons and quoting") from None
    finally:
        loader.dispose()
    return data, node


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply dotted `key=value` overrides, and validate everything."""
    data, node = read_yaml(path)
    return _finish(data, Source(str(path), node), overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dicts/lists, as written to a run's `config.yaml`."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal RunConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------- documentation


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field), which Python itself discards."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        a.target.id: inspect.cleandoc(b.value.value)
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(a.target, ast.Name)
        and isinstance(b, ast.Expr)
        and isinstance(b.value, ast.Constant)
        and isinstance(b.value.value, str)
    }


def _default_text(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}()"
    if isinstance(value, list) and any(map(dataclasses.is_dataclass, value)):
        return "[" + ", ".join(map(_default_text, value)) + "]"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


_SECTIONS = (
    (RunConfig, "top level"),
    (DataConfig, "`data`"),
    (QuantizeConfig, "`quantize`; omitted or null: a full-precision base"),
    (StageConfig, "each item of `stages`"),
    (LoraConfig, "`stages.<i>.lora`"),
    (ReftConfig, "`stages.<i>.reft`"),
)


def render_config_reference() -> str:
    """Markdown reference of every config key, generated so that it cannot drift from the code."""
    out = [
        "# Config reference (generated by `python -m heft.config`; do not edit by hand)",
        "",
        "A run config is a YAML file with the keys below; omitted keys take their defaults. Overrides are "
        "`key=value` pairs with dotted paths and list indices (`stages.0.epochs=3`, "
        "`stages.1.reft.layers=[2,4]`, `max_train_examples=null`); values are parsed as YAML. "
        "`method: dora` implies `lora.use_dora: true`; `method: loreft`/`direft` sets `reft.kind`.",
    ]
    for cls, where in _SECTIONS:
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        out += [
            "",
            f"## {cls.__name__} ({where})",
            "",
            _one_line((cls.__doc__ or "").split("\n\n")[0]),
            "",
            "| key | type | default | description |",
            "|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            cells = (
                f"`{f.name}`",
                f"`{_type_name(hints[f.name])}`",
                f"`{_default_text(value)}`",
                _one_line(docs.get(f.name)),
            )
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[2] / "configs" / "README.md"
    readme.write_text(render_config_reference())
    print(f"wrote {readme}")
