"""lm-evaluation-harness on a heft model: the field's yardstick, with heft's interventions where heft puts them.

`HeftLM` is lm-eval's model interface (`lm_eval.api.model.LM`) over a `HeftModel`. Every request is
split as heft splits its own examples: the context is the prompt, tokenised with the tokenizer's
special tokens and edited by the ReFT stages (as in training), and the continuation is tokenised as
it follows the prompt and never edited. So `heft eval RUN --lm-eval arc_easy` computes what
`heft eval RUN` computes, through lm-eval's own task, metrics and result files; prompts sharing a
context run once, in batches sorted by length (`heft.evaluate.continuation_scores`).

lm-eval is an optional extra (`pip install 'heft[lm-eval]'`, which `make setup` installs), imported
only here. The tasks heft ships (`lm_eval_tasks/`: arc_easy, arc_challenge, openbookqa, boolq) read
parquet files under `$HEFT_DATA_DIR`, so no hub access is needed; any other lm-eval task, or a task
folder given with `include`, runs as lm-eval defines it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from heft.evaluate import autocast, continuation_scores, pad_batch
from heft.files import atomic_write_text
from heft.pipeline import HeftModel
from heft.tasks.base import continuation_ids
from heft.tasks.data import DataError
from heft.tasks.presets import SHARED_DATA

try:
    from lm_eval.api.model import LM
except ImportError as err:  # an optional extra: say how to get it rather than a bare import error
    raise ImportError("lm-eval is not installed; `pip install 'heft[lm-eval]'` (or `make setup`) installs it") from err

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
"""The lm-eval task YAMLs heft ships: its four benchmarks with its own prompts, read from local parquet files."""

DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's default number of generated tokens when a task's `generation_kwargs` set none."""

_VARIABLE = re.compile(r"\$\{(\w+)\}")


class HeftLM(LM):
    """lm-eval's three request types on a `HeftModel`, scored as `heft eval` scores (`batch_size`
    contexts per batch, bf16 autocast as the run trained)."""

    def __init__(self, model: HeftModel, batch_size: int = 16, bf16: bool = False, progress: bool = True) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = model.tokenizer
        self.batch_size = batch_size
        self.bf16 = bf16
        self.progress = progress
        self.max_length = getattr(model.model.config, "max_position_embeddings", None) or 2048
        self._device = model.device

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context starts from (BOS, else EOS), as lm-eval's HF model uses."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records under `config` in its results: the base model and the stages on it."""
        return {
            "heft_base_model": self.model.model_id,
            "heft_base_sha256": self.model.weights_sha256,
            "heft_stages": [s.name for s in self.model.stages if not s.rolled_back],
            "heft_bf16": self.bf16,
        }

    # ------------------------------------------------------------ requests
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (context, continuation)."""
        return self._score([self._encode_pair(*request.args) for request in requests], "loglikelihood")

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's windows of the model's length; each window's
        context (the prefix token, or the tokens before its scored span) is the edited prompt."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (loglik, _) in zip(owners, self._score(windows, "loglikelihood_rolling")):
            totals[index] += loglik
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy (or the task's sampling) continuation of each context, cut at the first stop string;
        the interventions edit the prompt only, as in `heft eval --mode generate`."""
        by_options: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_options.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        texts: list[str] = [""] * len(requests)
        for indices in by_options.values():
            until, max_new_tokens, options = _generation_options(requests[indices[0]].args[1])
            prompts = [self._generation_prompt(requests[i].args[0], max_new_tokens) for i in indices]
            order = sorted(range(len(indices)), key=lambda j: len(prompts[j]))
            with self._computing():
                for batch in tqdm(_chunks(order, self.batch_size), desc="generate_until", **self._bar()):
                    outputs = self._generate([prompts[j] for j in batch], until, max_new_tokens, options)
                    for j, text in zip(batch, outputs):
                        texts[indices[j]] = text
        return texts

    # ------------------------------------------------------------ helpers
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt and continuation ids as heft encodes its examples; trailing spaces of the context move to
        the continuation (lm-eval's rule), and a context too long for the model loses its start."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        prompt = self.tokenizer(context)["input_ids"] if context else []
        (tokens,) = continuation_ids(self.tokenizer, [context], [continuation])
        room = self.max_length - len(tokens)
        if room < 1:
            raise ValueError(
                f"a continuation of {len(tokens)} tokens leaves no room for its context in the model's "
                f"{self.max_length} positions"
            )
        return (prompt or [self.prefix_token_id])[-room:], tokens

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """`continuation_scores` of (prompt, continuation) pairs; each distinct prompt runs once."""
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for index, (prompt, _) in enumerate(pairs):
            by_prompt.setdefault(tuple(prompt), []).append(index)
        prompts = sorted(by_prompt, key=len)  # stable: as `heft eval` orders its examples
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        with self._computing():
            for batch in tqdm(_chunks(prompts, self.batch_size), desc=desc, **self._bar()):
                continuations = [[pairs[i][1] for i in by_prompt[prompt]] for prompt in batch]
                for prompt, scores in zip(batch, continuation_scores(self.model, batch, continuations)):
                    for index, score in zip(by_prompt[prompt], scores):
                        results[index] = score
        return results

    def _generation_prompt(self, context: str, max_new_tokens: int) -> list[int]:
        """The context's ids, cut from the start to leave `max_new_tokens` positions."""
        ids = self.tokenizer(context)["input_ids"] or [self.prefix_token_id]
        return ids[-max(1, self.max_length - max_new_tokens) :]

    def _generate(
        self, prompts: list[list[int]], until: list[str], max_new_tokens: int, options: dict[str, Any]
    ) -> list[str]:
        """Generate from a batch of prompts; a batch stops early once every row has passed a stop string
        (lm-eval's own stopping criterion: HF's `stop_strings` cannot read every tokenizer's vocabulary)."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        ids, mask = pad_batch(prompts, self.tokenizer.pad_token_id, "left")
        stopping = stop_sequences_criteria(self.tokenizer, until, ids.shape[1], len(prompts))
        generated = self.model.generate(
            ids.to(self._device),
            mask.to(self._device),
            max_new_tokens=max_new_tokens,
            stopping_criteria=stopping,
            **options,
        )
        texts = self.tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
        return [_cut_at(text, until) for text in texts]

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        """Evaluation mode, no gradients, and the run's bf16 autocast with the frozen weights cast once."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.frozen_weights_bf16(self.bf16), autocast(self.model, self.bf16):
                yield
        finally:
            self.model.train(was_training)

    def _bar(self) -> dict[str, Any]:
        return {"disable": not self.progress, "leave": False}


def _chunks(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _generation_options(gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
    """Stop strings, token budget and HF `generate` options from a task's `generation_kwargs`:
    temperature 0 (or no sampling asked) is greedy decoding, as in lm-eval's HF model."""
    options = dict(gen_kwargs)
    until = options.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new_tokens = int(options.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    if not options.get("do_sample") or options.get("temperature") == 0:
        options = {k: v for k, v in options.items() if k not in ("temperature", "top_p", "top_k")}
        options["do_sample"] = False
    return until, max_new_tokens, options


def _cut_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text


# ---------------------------------------------------------------- tasks
def data_dir() -> Path:
    """`$HEFT_DATA_DIR`, else heft's default `../shared/data` (from the working directory, as heft's
    own tasks read it), as an absolute path."""
    return Path(os.environ.get("HEFT_DATA_DIR") or SHARED_DATA).expanduser().resolve()


def shipped_tasks() -> dict[str, Path]:
    """Task name → YAML file of the tasks heft ships."""
    return {yaml.safe_load(path.read_text(encoding="utf-8"))["task"]: path for path in sorted(TASKS_DIR.glob("*.yaml"))}


def shipped_task_config(path: Path) -> dict[str, Any]:
    """A shipped task's lm-eval config with `${HEFT_DATA_DIR}` (or another `${VARIABLE}`) filled into its
    data files, which must exist: a missing one is named with the YAML file and field that point to it."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    for split, pattern in files.items():
        field = f"dataset_kwargs.data_files.{split}"
        resolved = _VARIABLE.sub(lambda match: _variable(match.group(1), path, field), pattern)
        if not Path(resolved).is_file():
            raise DataError(
                f"{path}: {field}: no file {resolved}",
                hint="set HEFT_DATA_DIR to the folder that holds "
                f"{config['task']}/ (now {data_dir()}), as for `heft train`",
            )
        files[split] = resolved
    return config


def _variable(name: str, path: Path, field: str) -> str:
    if name == "HEFT_DATA_DIR":
        return str(data_dir())
    if name not in os.environ:
        raise ValueError(f"{path}: {field}: the environment variable {name} is not set")
    return os.environ[name]


@dataclass
class LmEvalTasks:
    """Tasks found for `run_lm_eval`: what `simple_evaluate` is given, and the task manager that knows them."""

    specs: list[str | dict[str, Any]]
    manager: Any


def find_tasks(names: Sequence[str], include: Sequence[Path] = ()) -> LmEvalTasks:
    """The lm-eval tasks called `names`: a task in an `include` folder first, then a task heft ships (its
    config, data paths filled in and checked), then one of lm-eval's own. lm-eval's ~15,000 task files
    are indexed (about 10 s) only when a name needs them. Cheap otherwise, so a bad name or missing
    data fails before the model loads."""
    from lm_eval.tasks import TaskManager

    if not names:
        raise ValueError("--lm-eval needs at least one task name, e.g. --lm-eval arc_easy")
    for folder in include:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--lm-eval-include {folder}: no such folder")
    paths = [str(folder) for folder in include] or None
    manager = TaskManager(include_path=paths, include_defaults=False)
    own, shipped = set(manager.all_tasks), shipped_tasks()
    if any(name not in own and name not in shipped for name in names):
        manager = TaskManager(include_path=paths, include_defaults=True)
        unknown = [name for name in names if name not in manager.all_tasks and name not in shipped]
        if unknown:
            close = difflib.get_close_matches(unknown[0], [*manager.all_tasks, *shipped], n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown lm-eval task {unknown[0]!r}; {hint}heft ships {sorted(shipped)} for offline use")
    specs = [name if name in own or name not in shipped else shipped_task_config(shipped[name]) for name in names]
    return LmEvalTasks(specs, manager)


# ---------------------------------------------------------------- running
def run_lm_eval(
    model: HeftModel,
    tasks: LmEvalTasks,
    batch_size: int = 16,
    bf16: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `tasks` (zero-shot prompts, per-document samples kept) on `model`;
    `limit` keeps each task's first documents. lm-eval logs at length: see `lm_eval_logs`."""
    from lm_eval import simple_evaluate

    lm = HeftLM(model, batch_size=batch_size, bf16=bf16, progress=progress)
    return simple_evaluate(model=lm, tasks=tasks.specs, task_manager=tasks.manager, limit=limit, log_samples=True)


@contextlib.contextmanager
def lm_eval_logs(log_file: Path | None, verbose: bool = False) -> Iterator[None]:
    """While the block runs, lm-eval's log goes to `log_file` (created at its first line) and reaches
    the console only when `verbose`; the datasets library's split-building bars are hidden."""
    import datasets

    logger = logging.getLogger("lm_eval")
    saved = logger.level, logger.propagate
    handler = logging.FileHandler(log_file, encoding="utf-8", delay=True) if log_file else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    bars = datasets.utils.logging.is_progress_bar_enabled()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = verbose
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if bars:
            datasets.enable_progress_bars()


def write_results(results: dict[str, Any], folder: Path, stem: str) -> tuple[Path, Path]:
    """lm-eval's results as `<stem>.json` (what its own CLI writes, without the samples) and the
    per-document samples as `<stem>-samples.jsonl` (one line each, with its task), for paired comparisons."""
    from lm_eval.utils import handle_non_serializable

    summary = {key: value for key, value in results.items() if key != "samples"}
    path = folder / f"{stem}.json"
    atomic_write_text(path, json.dumps(summary, indent=2, default=handle_non_serializable) + "\n")
    samples = folder / f"{stem}-samples.jsonl"
    lines = (
        json.dumps({"task": task, **sample}, default=handle_non_serializable)
        for task, task_samples in results.get("samples", {}).items()
        for sample in task_samples
    )
    atomic_write_text(samples, "".join(line + "\n" for line in lines))
    return path, samples


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of the results (and of groups, when a task was a group)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")
