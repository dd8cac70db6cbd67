"""The run configuration's schema: plain dataclasses, the constraints their annotations cannot
express, and the checks across fields. Reading YAML files, dicts and key=value overrides into them
is `heft.config_loader`'s job; `load_config` and `config_from_dict` bind the two."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heft.config_loader import Checks, Source, apply_override, build, dotted, read_yaml, remember_source
from heft.config_loader import ConfigError as ConfigError  # raised for every bad config; callers catch it from here
from heft.methods.lora.config import LoraConfig
from heft.methods.reft.config import ReftConfig, parse_positions
from heft.quantize import BACKENDS, BITS, COMPUTE_DTYPES, QUANT_TYPES, REFUSED_BACKENDS, QuantizeConfig
from heft.quantize import device_type as quantize_device_type
from heft.quantize import problems as quantize_problems

METHODS = ("lora", "dora", "loreft", "direft", "joint")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
TRACKERS = ("tensorboard", "wandb", "mlflow")
"""Experiment trackers `report_to` accepts (accelerate's names)."""


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
    subset: str | None = None
    """The hub dataset's configuration, e.g. ARC-Easy of allenai/ai2_arc (`load_dataset(source, subset)`);
    None: its default one. Local data has none."""
    train_split: str = "train"
    """Split (or file stem inside a local folder) used for training."""
    eval_split: str | None = None
    """Split used for evaluation. None: the task's default (validation for BoolQ, test for multiple
    choice), resolved when the data is read; a local folder without that file evaluates on its
    validation, else its test file, else on examples held out of the training split (with a warning)."""
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
    task: str | dict[str, Any] = "boolq"
    """A registered task (boolq, arc_easy, arc_challenge, openbookqa), a task kind with its defaults
    (yes_no, multiple_choice, completion), or a mapping of a `kind` and its options, e.g.
    {kind: multiple_choice, template: "Q: {question}\\nA:", headline: acc}; the kinds' options are listed below."""
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
    pad_to_multiple_of: int | str | None = "auto"
    """Round each training batch's length up to a multiple of this, so that compiled layers (CUDA graphs
    above all, one per shape) see a bounded set of shapes; the loss is unchanged (padding is masked out).
    auto: 64 on CUDA, none on the CPU; None or 1: pad to the longest example only."""
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
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive the training curves, evaluations, stage boundaries and
    results: tensorboard, wandb, mlflow (through accelerate; each needs its package). Local logs go to
    `<output_dir>/logs`; wandb runs offline unless WANDB_MODE or an API key is set."""
    log_every: int = 10
    """Optimizer steps between the training loss, learning rate and tokens/s points sent to `report_to`."""
    output_dir: str = "runs/{task}-{time}"
    """Run folder; `{task}`, `{model}` and `{time}` are filled in."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    """The hierarchy, trained in order; each stage freezes everything before it."""

    def __post_init__(self) -> None:
        self.stages = [resolve_merge(stage, self.quantize is not None) for stage in self.stages]


# --------------------------------------------------------------------------- constraints & checks


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

CHECKS: Checks = {
    (RunConfig, "dtype"): _one_of("float32", "bfloat16"),
    (RunConfig, "task"): (
        lambda v: isinstance(v, str) or isinstance(v.get("kind"), str),
        "a task name, or a mapping of a 'kind' and its options",
    ),
    (RunConfig, "eval_every"): (
        lambda v: v == "never" or is_eval_interval(v),
        "one of epoch, stage, never, or a number of epochs > 0",
    ),
    (RunConfig, "compile"): _one_of(*COMPILE_MODES),
    (RunConfig, "pad_to_multiple_of"): (
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
        "auto or a whole number > 0",
    ),
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
    (RunConfig, "report_to"): (lambda v: set(v) <= set(TRACKERS), "a list of " + ", ".join(TRACKERS)),
    (RunConfig, "log_every"): _POSITIVE,
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
"""Constraints the annotations cannot express, keyed by (dataclass, field); None values skip them."""


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


def _check_across_fields(cfg: RunConfig, src: Source) -> None:
    """Rules that tie fields together; the task itself is checked where it is resolved
    (`heft.tasks.task_for`), with the source this config keeps."""
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
            src.fail(f"'{dotted(problem.key)}': {problem.problem}", problem.key, hint=problem.hint)
    for i, stage in enumerate(cfg.stages):
        if stage.keep == "if_better" and cfg.data.dev_examples is None:
            src.fail(
                "'keep: if_better' needs a dev split",
                ("stages", i, "keep"),
                hint="set data.dev_examples (e.g. 200), carved out of the training split",
            )
    if cfg.data.eval_split == cfg.data.train_split and cfg.max_eval_examples is None:
        src.fail(
            "evaluating on the training split needs max_eval_examples",
            ("max_eval_examples",),
            hint="the evaluation examples are held out of training, so their number must be set",
        )


# --------------------------------------------------------------------------- reading & writing


def _finish(data: Any, src: Source, overrides: Sequence[str]) -> RunConfig:
    data = copy.deepcopy(data)
    if not isinstance(data, dict):
        build(RunConfig, data, (), src, CHECKS)  # reports the bad top level before overrides touch it
    defaults = config_to_dict(RunConfig())
    for text in overrides:
        apply_override(data, text, defaults, src)
    cfg = build(RunConfig, data, (), src, CHECKS)
    _check_across_fields(cfg, src)
    remember_source(cfg, src)
    return cfg


def config_from_dict(d: dict, source: str = "<dict>") -> RunConfig:
    """Build and validate a RunConfig from plain data (the Python API); `source` names it in errors."""
    return _finish(d, Source(source), ())


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
