"""`heft bench`: throughput, MFU and peak memory of heft's paths against the machine's own GEMM peak.

The development machines change from one session to the next (a 2-core EPYC without AMX, a Xeon
with AMX, an H100), so absolute tokens/s are not comparable between runs. What is comparable is a
ratio measured in one process: each path's model FLOPs against the bf16 GEMM peak of this machine
at this model's own matrix shapes, and heft's LoRA stage against plain transformers + peft on the
same batches. A benchmark, not a test: numbers are recorded, nothing is asserted.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import shlex
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import peft
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from heft.config import COMPILE_MODES, RunConfig, StageConfig
from heft.data import collate, length_grouped_batches, load_data, pad_multiple
from heft.evaluate import autocast, predict
from heft.methods.lora import LoraConfig, to_peft_config
from heft.methods.reft import ReftConfig
from heft.models import LoadedModel, decoder_layers, load_model
from heft.pipeline import HeftModel
from heft.quantize import QuantizeConfig
from heft.sysinfo import code_versions, cpu_flags, cpu_model_name, proc_status_mb, reset_peak_memory
from heft.tasks import EncodedExample, get_task

log = logging.getLogger("heft")

PATHS = ("scoring", "lora", "peft-lora", "loreft", "joint")
"""Every path, in the order they run: the peft reference right after heft's LoRA stage, so that
the ratio of the two spans as little drift of a busy machine as possible."""

FLOPS_CONVENTION = (
    "model FLOPs per token: 2·N forward (scoring), 4·N for a training step (forward + input gradients; "
    "the frozen base has no weight gradients); N = weights of the decoder's linear layers (no embeddings, "
    "no LM head, no attention scores, adapters not counted); tokens exclude padding; "
    "MFU = model FLOPs/s ÷ the bf16 GEMM peak measured in the same run"
)

SYNTHETIC_TARGETS = 2
"""Target tokens at the end of each synthetic example: a short answer, as BoolQ's " yes" or " no"."""

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The CPU features that decide bf16 GEMM speed, recorded because they explain a machine's peak."""


def stage_config(path: str, fast_dropout: bool = False) -> StageConfig:
    """The stage a path trains: the hyperparameters of configs/boolq_heft.yaml (joint: both), with
    `lora.fast_dropout` for heft's LoRA when asked (the peft reference keeps peft's dropout)."""
    fast_dropout = fast_dropout and path != "peft-lora"
    lora = LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="all-linear", fast_dropout=fast_dropout)
    reft = ReftConfig(kind="loreft", rank=4, layers="all", positions="f5+l5", dropout=0.05)
    method = {"lora": "lora", "peft-lora": "lora", "loreft": "loreft", "joint": "joint"}[path]
    return StageConfig(method=method, lora=lora, reft=reft)


def parse_paths(text: str) -> list[str]:
    """Comma-separated path names, validated and put in run order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(PATHS))
    if unknown or not names:
        raise ValueError(f"unknown --paths {unknown or text!r}; choose from {','.join(PATHS)}")
    return [path for path in PATHS if path in names]


@dataclass(frozen=True)
class Base:
    """How every path loads the frozen base, so that heft and the peft reference run on the same one."""

    model: str
    dtype: str = "float32"
    bits: int | None = None
    """4 (nf4, bf16 compute) or 8 (LLM.int8()): bitsandbytes, as a run's `quantize: {bits: ...}`; None: `dtype`."""
    tokenizer: bool = True

    def load(self) -> LoadedModel:
        quantize = None if self.bits is None else QuantizeConfig(bits=self.bits)
        return load_model(self.model, self.dtype, quantize, tokenizer=self.tokenizer)


def synthetic_examples(vocab: int, batches: int, batch_size: int, length: int, seed: int) -> list[list[EncodedExample]]:
    """Random token ids, every example `length` long with its last SYNTHETIC_TARGETS tokens the target:
    a randomly initialised model (a 7B-shaped one has no tokenizer at hand) runs as fast on these as on
    text, and needs no data set."""
    ids = torch.randint(0, vocab, (batches, batch_size, length), generator=torch.Generator().manual_seed(seed))
    prompt = length - SYNTHETIC_TARGETS
    return [[EncodedExample(row.tolist(), prompt, 0, False) for row in batch] for batch in ids]


# ------------------------------------------------------------------------------------------ GEMM
def linear_shapes(model: nn.Module) -> Counter[tuple[int, int]]:
    """(in, out) of every linear layer in the decoder blocks, with how often each occurs."""
    return Counter(
        (m.in_features, m.out_features)
        for layer in decoder_layers(model)
        for m in layer.modules()
        if isinstance(m, nn.Linear)
    )


def _significant(x: float) -> float:
    """Four significant digits: enough for a benchmark, and tiny test models do not round to 0."""
    return float(f"{x:.4g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""`wall`: elapsed time. `cpu`: this process's CPU time, for a machine shared with other jobs, where
wall time measures the neighbours; meaningful with `--threads 1` (more threads add their spin-waits)."""


def _seconds_per_call(
    fn: Callable[[], object], device: torch.device, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median time of one call over `repeats` rounds, after warm-up; a round repeats the call until
    it lasts ≥ 5 ms, so that timer resolution and kernel launches do not dominate small GEMMs."""
    fastest = float("inf")
    for _ in range(3):  # warm-up; the fastest call sizes the rounds (a slow one may be a preemption)
        start = clock()
        fn()
        _sync(device)
        fastest = min(fastest, clock() - start)
    calls = max(1, int(0.005 / max(fastest, 1e-9)))
    rounds = []
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            fn()
        _sync(device)
        rounds.append((clock() - start) / calls)
    return statistics.median(rounds)


def gemm_peak(
    shapes: Counter[tuple[int, int]],
    m: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """GFLOP/s of x(m, in) @ W(in, out) per shape, and over the whole set weighted by how often each
    shape occurs (total FLOPs ÷ total time: the peak a forward pass could reach)."""
    rows, flops_total, seconds_total = [], 0.0, 0.0
    for (n_in, n_out), count in sorted(shapes.items()):
        x = torch.randn(m, n_in, dtype=dtype, device=device)
        w = torch.randn(n_out, n_in, dtype=dtype, device=device)
        seconds = _seconds_per_call(lambda: F.linear(x, w), device, repeats, clock)
        flops = 2.0 * m * n_in * n_out
        rows.append({"in": n_in, "out": n_out, "count": count, "gflops": _significant(flops / seconds / 1e9)})
        flops_total, seconds_total = flops_total + count * flops, seconds_total + count * seconds
    return {"gflops": _significant(flops_total / seconds_total / 1e9), "shapes": rows}


# ---------------------------------------------------------------------------------------- memory
def _memory_peak(device: torch.device, baseline: float | None) -> float | None:
    """CUDA: max allocated (weights included). CPU: peak RSS above the baseline (activations,
    gradients, optimizer state); None where the OS does not say."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = proc_status_mb("VmHWM")
    return None if peak is None or baseline is None else round(peak - baseline, 1)


# ----------------------------------------------------------------------------------------- paths
@dataclass
class Workload:
    """One path made ready to time: a step per batch, the tokens it processes, its model FLOPs."""

    step: Callable[[int], None]
    tokens: Callable[[int], int]
    flops_per_token: float
    trainable_params: int
    close: Callable[[], None] = lambda: None
    """Leave what the path entered for its whole run (heft's bf16 copies of the frozen weights)."""


def _train_step(
    forward: Callable[[dict], torch.Tensor], params: list[nn.Parameter], batches: Sequence[dict]
) -> Callable[[int], None]:
    """Loss, backward and an AdamW step, as heft's recipe does for every micro-batch."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(i: int) -> None:
        forward(batches[i]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _peft_workload(
    base: Base,
    batches: Sequence[dict],
    train_tokens: list[int],
    device: torch.device,
    n_linear: int,
    activation_checkpointing: bool,
) -> Workload:
    """The reference: transformers + peft LoRA by the usual route, full-vocabulary logits at every
    position and the loss by transformers; on a quantized base, QLoRA's recipe
    (`prepare_model_for_kbit_training`)."""
    loaded = base.load().model
    if base.bits is None:
        loaded = loaded.to(device)
    else:  # loaded onto the device; float32 norms, embeddings and head, as QLoRA trains
        loaded = peft.prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = peft.get_peft_model(loaded, to_peft_config(stage_config("peft-lora").lora, loaded))
    if activation_checkpointing:
        model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def forward(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss

    params = [p for p in model.parameters() if p.requires_grad]
    return Workload(
        _train_step(forward, params, batches),
        train_tokens.__getitem__,
        4.0 * n_linear,
        sum(p.numel() for p in params),
    )


def _workload(
    path: str,
    base: Base,
    examples: Sequence[Sequence[EncodedExample]],
    batches: Sequence[dict],
    device: torch.device,
    n_linear: int,
    seed: int,
    activation_checkpointing: bool = False,
    compile_mode: str | None = None,
    fast_dropout: bool = False,
) -> Workload:
    """A fresh model per path, so that no path inherits another's adapters, optimizer or memory.
    `compile_mode` compiles heft's training paths as `heft train` does (the peft reference stays eager);
    `fast_dropout` is their `lora.fast_dropout`."""
    train_tokens = [int(b["attention_mask"].sum()) for b in batches]
    if path == "peft-lora":
        return _peft_workload(base, batches, train_tokens, device, n_linear, activation_checkpointing)

    heft_model = HeftModel(base.load()).to(device)
    # The bf16 copies of the frozen weights are made once per path, as `evaluate` makes them once per
    # evaluation set and `heft train` once per epoch (here: after the model and stage are built).
    held = contextlib.ExitStack()
    if path == "scoring":
        task = get_task("boolq")
        held.enter_context(heft_model.frozen_weights_bf16())
        return Workload(
            lambda i: predict(heft_model, task, examples[i], batch_size=len(examples[i]), progress=False, bf16=True),
            lambda i: sum(e.prompt_len for e in examples[i]),
            2.0 * n_linear,
            0,
            held.close,
        )
    stage = heft_model.add_stage(stage_config(path, fast_dropout), seed=seed)
    if activation_checkpointing:
        heft_model.enable_activation_checkpointing()
    heft_model.train()
    held.enter_context(heft_model.frozen_weights_bf16())
    held.enter_context(heft_model.compiled_layers(compile_mode))

    def heft_forward(batch: dict) -> torch.Tensor:
        with autocast(heft_model, True):
            return heft_model(**batch).loss

    return Workload(
        _train_step(heft_forward, heft_model.trainable_parameters(), batches),
        train_tokens.__getitem__,
        4.0 * n_linear,
        stage.trainable_params,
        held.close,
    )


def measure(
    work: Workload,
    num_batches: int,
    warmup: int,
    device: torch.device,
    peak_gflops: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Time every batch once after `warmup` untimed steps; the memory window covers both."""
    baseline = reset_peak_memory(device)
    start = clock()
    for i in range(warmup):
        work.step(i % num_batches)
    _sync(device)
    warmup_seconds = clock() - start
    start = clock()
    for i in range(num_batches):
        work.step(i)
    _sync(device)
    seconds = clock() - start
    tokens = sum(work.tokens(i) for i in range(num_batches))
    tok_s = tokens / seconds
    return {
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "warmup_seconds": round(warmup_seconds, 4),
        "tok_s": round(tok_s, 2),
        "flops_per_token": work.flops_per_token,
        "mfu": _significant(work.flops_per_token * tok_s / (peak_gflops * 1e9)),
        "peak_memory_mb": _memory_peak(device, baseline),
        "trainable_params": work.trainable_params,
    }


# -------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    """What decides the peak: CPU model and features, cores, torch threads, GPU."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model_name(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
    }


@dataclass
class BenchSettings:
    """`heft bench`'s options, one field per command-line option.

    `dtype`: the base's weights (bfloat16 for a model whose float32 copy would not fit); `quantize`: a 4- or
    8-bit bitsandbytes base for every path (the peft reference is then QLoRA); `synthetic`: random token ids
    of full length instead of BoolQ, for a randomly initialised model saved without a tokenizer (the training
    paths only); `plan`: `heft plan`'s peak for each of heft's training paths beside the measured one.
    `threads`: torch's CPU threads (None: torch's default); `clock`: see CLOCKS; `activation_checkpointing`:
    the training paths recompute each layer in the backward pass (memory against time); `compile_mode`:
    heft's training paths run compiled decoder layers (`warmup_seconds` then includes the compilation;
    with the CPU clock only what this process spends on it, not its compiler processes);
    `pad_to_multiple_of`: batch widths rounded up as training rounds them (`auto`: 64 on CUDA, none on the CPU);
    `fast_dropout`: heft's LoRA stages draw dropout masks with `lora.fast_dropout` (other masks than peft's).
    """

    model: str = "smollm2-135m"
    batches: int = 12
    batch_size: int = 8
    max_length: int = 256
    device: str | None = None
    paths: Sequence[str] = PATHS
    repeats: int = 10
    warmup: int = 1
    seed: int = 42
    threads: int | None = None
    clock: str = "wall"
    activation_checkpointing: bool = False
    compile_mode: str | None = None
    pad_to_multiple_of: int | str | None = "auto"
    dtype: str = "float32"
    quantize: int | None = None
    synthetic: bool = False
    fast_dropout: bool = False
    plan: bool = False

    def checked(self) -> tuple[torch.device, list[str], int]:
        """The device, the paths in run order and the resolved pad multiple; ValueError naming the
        option for a value that cannot run, before anything is loaded."""
        dev = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.clock not in CLOCKS or (self.clock == "cpu" and dev.type != "cpu"):
            raise ValueError(f"--clock {self.clock!r}: choose wall, or cpu on a CPU device")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be ≥ 1")
        paths = parse_paths(",".join(self.paths))
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"--compile {self.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
        multiple = pad_multiple(self.pad_to_multiple_of, dev)
        if min(self.batches, self.batch_size, self.max_length, self.repeats, multiple) < 1 or self.warmup < 0:
            raise ValueError(
                "--batches, --batch-size, --max-length, --repeats and --pad-to-multiple-of must be ≥ 1, --warmup ≥ 0"
            )
        if self.quantize not in (None, 4, 8):
            raise ValueError(f"--quantize {self.quantize}: a quantized base has 4 or 8 bits")
        if self.synthetic and ("scoring" in paths or self.max_length <= SYNTHETIC_TARGETS):
            raise ValueError(
                f"--synthetic times the training paths, at --max-length > {SYNTHETIC_TARGETS}; drop scoring"
            )
        return dev, paths, multiple

    def command_line(self, device: torch.device, paths: Sequence[str], multiple: int) -> str:
        """The command that reruns this benchmark with every option spelled out (and the data folder)."""
        args = ["heft", "bench", "--model", self.model, "--batches", str(self.batches)]
        args += ["--batch-size", str(self.batch_size), "--max-length", str(self.max_length)]
        args += ["--device", str(device), "--paths", ",".join(paths)]
        args += ["--repeats", str(self.repeats), "--warmup", str(self.warmup)]
        args += ["--threads", str(self.threads)] if self.threads else []
        args += ["--clock", self.clock] if self.clock != "wall" else []
        args += ["--activation-checkpointing"] if self.activation_checkpointing else []
        args += ["--compile", self.compile_mode] if self.compile_mode else []
        args += ["--pad-to-multiple-of", str(multiple)] if multiple != 1 else []
        args += ["--dtype", self.dtype] if self.dtype != "float32" else []
        args += ["--quantize", str(self.quantize)] if self.quantize else []
        args += ["--synthetic"] if self.synthetic else []
        args += ["--fast-dropout"] if self.fast_dropout else []
        args += ["--plan"] if self.plan else []
        data_dir = os.environ.get("HEFT_DATA_DIR")
        return (f"HEFT_DATA_DIR={shlex.quote(data_dir)} " if data_dir else "") + shlex.join(args)


# ------------------------------------------------------------------------------------------ data
def _boolq_data(
    model: str, batches: int, batch_size: int, max_length: int, seed: int
) -> tuple[Counter[tuple[int, int]], list[list[EncodedExample]], str, int]:
    """The model's linear shapes, `batches` BoolQ training batches, their source and the pad id."""
    probe = HeftModel.from_pretrained(model)
    cfg = RunConfig(
        model=model,
        task="boolq",
        max_length=max_length,
        max_train_examples=batches * batch_size,
        max_eval_examples=batch_size,
        seed=seed,
    )
    splits = load_data(get_task("boolq"), cfg, probe.tokenizer)
    # Length-grouped as heft trains; with ≤ 32 batches that means each batch holds examples of similar length.
    order = length_grouped_batches([len(e.input_ids) for e in splits.train], batch_size, seed)[:batches]
    examples = [[splits.train[i] for i in batch] for batch in order]
    return linear_shapes(probe.model), examples, splits.info["source"], probe.tokenizer.pad_token_id


def _synthetic_data(
    model: str, batches: int, batch_size: int, max_length: int, seed: int
) -> tuple[Counter[tuple[int, int]], list[list[EncodedExample]], str, int]:
    """As `_boolq_data`, from the model's config alone (shapes on the meta device) and random token ids."""
    from transformers import AutoModelForCausalLM

    from heft.memory_plan import model_config

    config = model_config(model)
    with torch.device("meta"):
        shapes = linear_shapes(AutoModelForCausalLM.from_config(config))
    examples = synthetic_examples(config.vocab_size, batches, batch_size, max_length, seed)
    return shapes, examples, f"synthetic token ids (vocabulary {config.vocab_size:,})", 0


PLAN_MEASURE = (
    "plan_peak_mb: `heft plan`'s peak for the path's stage at this batch shape, weights included (on CUDA "
    "comparable with max allocated; on the CPU the measured peak is above the loaded model's RSS)"
)


def planned_peak_mb(
    base: Base, path: str, batch_size: int, max_length: int, synthetic: bool, device: torch.device, checkpointing: bool
) -> float:
    """What `heft plan` predicts for the stage `path` trains, on this base and batch shape."""
    from heft.memory_plan import default_target_tokens, plan_run, resolve_device

    targets = SYNTHETIC_TARGETS if synthetic else default_target_tokens(get_task("boolq"))
    cfg = RunConfig(
        model=base.model,
        task="boolq",
        max_length=max_length,
        batch_size=batch_size,
        dtype=base.dtype,
        bf16=True,
        stages=[stage_config(path)],
    )
    plan = plan_run(cfg, resolve_device(str(device), None), targets, weight_bits=base.bits, alternatives=False)
    stage = plan.stages[0]
    return round((stage.peak_checkpointed if checkpointing else stage.peak) / 2**20, 1)


# ------------------------------------------------------------------------------------------ main
def run_bench(model: str = "smollm2-135m", **options: object) -> dict:
    """Measure the GEMM peaks, then every path on the same BoolQ batches; returns the JSON record.
    `options`: the fields of BenchSettings."""
    return Bench(BenchSettings(model, **options)).run()  # type: ignore[arg-type]


class Bench:
    """One `heft bench` run: the batches and GEMM peaks it shares across paths, then each path's
    measurement, and the JSON record of all of it."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.device, self.paths, self.multiple = settings.checked()
        self.timer = CLOCKS[settings.clock]
        self.base = Base(settings.model, settings.dtype, settings.quantize, tokenizer=not settings.synthetic)

    def run(self) -> dict:
        if self.settings.threads is not None:
            torch.set_num_threads(self.settings.threads)
        self._load_batches()
        self.gemm = {
            name: gemm_peak(self.shapes, self.m, dtype, self.device, self.settings.repeats, self.timer)
            for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
        }
        results = {path: self._measure(path) for path in self.paths}
        return self.record(results)

    @property
    def path_warmup(self) -> int:
        """Untimed steps per path. On CUDA every batch runs once untimed before the timed pass: the first
        use of a shape in a process pays cuBLAS and allocator set-up, which otherwise lands on whichever
        path meets that shape first (on one H200, heft's LoRA path, measured first, read 0.36× the peft
        path measured right after it)."""
        if self.device.type == "cuda":
            return max(self.settings.warmup, len(self.collated))
        return self.settings.warmup

    def _load_batches(self) -> None:
        s = self.settings
        data = _synthetic_data if s.synthetic else _boolq_data
        self.shapes, self.examples, self.source, pad_id = data(s.model, s.batches, s.batch_size, s.max_length, s.seed)
        self.n_linear = sum(count * n_in * n_out for (n_in, n_out), count in self.shapes.items())
        self.collated = [
            {k: v.to(self.device) for k, v in collate(ex, pad_id, pad_to_multiple_of=self.multiple).items()}
            for ex in self.examples
        ]
        self.m = round(statistics.mean(b["input_ids"].numel() for b in self.collated))
        log.info(
            "bench: %d batches of %d on %s; GEMM peaks at M = %d", len(self.collated), s.batch_size, self.device, self.m
        )

    def _measure(self, path: str) -> dict:
        """One path on a fresh model, released before the next path loads its own."""
        s = self.settings
        log.info("bench: %s", path)
        torch.manual_seed(s.seed)
        work = _workload(
            path,
            self.base,
            self.examples,
            self.collated,
            self.device,
            self.n_linear,
            s.seed,
            s.activation_checkpointing,
            s.compile_mode,
            s.fast_dropout,
        )
        result = measure(
            work, len(self.collated), self.path_warmup, self.device, self.gemm["bfloat16"]["gflops"], self.timer
        )
        if s.plan and path not in ("scoring", "peft-lora"):
            result["plan_peak_mb"] = planned_peak_mb(
                self.base, path, s.batch_size, s.max_length, s.synthetic, self.device, s.activation_checkpointing
            )
        work.close()
        del work
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return result

    def record(self, results: dict[str, dict]) -> dict:
        """The JSON record: the command that reruns it, machine, versions, data, settings and results."""
        s = self.settings
        ratio = (
            round(results["lora"]["tok_s"] / results["peft-lora"]["tok_s"], 3)
            if {"lora", "peft-lora"} <= results.keys()
            else None
        )
        return {
            "command": s.command_line(self.device, self.paths, self.multiple),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(self.device),
            "versions": code_versions(),
            "model": {
                "id": s.model,
                "linear_params": self.n_linear,
                "linear_shapes": [[i, o, c] for (i, o), c in sorted(self.shapes.items())],
            },
            "data": {
                "source": self.source,
                "batches": len(self.collated),
                "batch_size": s.batch_size,
                "max_length": s.max_length,
                "tokens": sum(int(b["attention_mask"].sum()) for b in self.collated),
                "padded_tokens": sum(b["input_ids"].numel() for b in self.collated),
            },
            "settings": self._settings_record(),
            "flops_convention": FLOPS_CONVENTION,
            "memory_measure": "CUDA max allocated (weights included)"
            if self.device.type == "cuda"
            else "peak RSS above the RSS when the path's model was ready, freed memory first handed back to the OS",
            **({"plan_measure": PLAN_MEASURE} if s.plan else {}),
            "gemm": {"m": self.m, **self.gemm},
            "paths": results,
            "heft_lora_vs_peft_lora": ratio,
        }

    def _settings_record(self) -> dict:
        s = self.settings
        return {
            "bf16_autocast": True,
            "weights_dtype": s.dtype,
            "quantize": None if s.quantize is None else {"bits": s.quantize, "backend": "bitsandbytes"},
            "synthetic": s.synthetic,
            "lora_fast_dropout": s.fast_dropout,
            "heft_frozen_weights": "bf16 copies held for the path (HeftModel.frozen_weights_bf16)",
            "warmup_steps": s.warmup,
            "warmup_steps_run": self.path_warmup,
            "activation_checkpointing": s.activation_checkpointing,
            "compile": s.compile_mode,
            "pad_to_multiple_of": self.multiple,
            "gemm_repeats": s.repeats,
            "clock": s.clock,
            "stages": {p: asdict(stage_config(p, s.fast_dropout)) for p in self.paths if p != "scoring"},
        }


def tables(record: dict) -> list[Table]:
    """The GEMM peaks and the per-path results, for the terminal."""
    gemm = Table(
        title=f"GEMM peak at this model's shapes, M = {record['gemm']['m']} tokens ({record['machine']['cpu']}"
        + (f", {record['machine']['gpu']}" if record["machine"]["gpu"] else "")
        + ")"
    )
    for column in ("in × out", "count", "bf16 GFLOP/s", "fp32 GFLOP/s"):
        gemm.add_column(column, justify="right")
    for bf, fp in zip(record["gemm"]["bfloat16"]["shapes"], record["gemm"]["float32"]["shapes"]):
        gemm.add_row(f"{bf['in']} × {bf['out']}", str(bf["count"]), f"{bf['gflops']:,.1f}", f"{fp['gflops']:,.1f}")
    gemm.add_row(
        "[bold]all[/]",
        "",
        f"[bold]{record['gemm']['bfloat16']['gflops']:,.1f}[/]",
        f"{record['gemm']['float32']['gflops']:,.1f}",
    )
    data = record["data"]
    paths = Table(
        title=f"{data['batches']} BoolQ batches × {data['batch_size']} (max_length {data['max_length']}, "
        f"{data['tokens']:,} tokens), bf16 autocast, {record['machine']['device']}",
        caption=record["flops_convention"] + "; memory: " + record["memory_measure"],
    )
    planned = any("plan_peak_mb" in r for r in record["paths"].values())
    for column in ("path", "tok/s", "MFU", "peak MB", "warm-up s", "tokens", "vs peft-lora", "plan MB")[: 7 + planned]:
        paths.add_column(column, justify="left" if column == "path" else "right")
    for name, r in record["paths"].items():
        ratio = (
            f"{record['heft_lora_vs_peft_lora']:.2f}×" if name == "lora" and record["heft_lora_vs_peft_lora"] else ""
        )
        memory = "—" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:,.0f}"
        paths.add_row(
            name,
            f"{r['tok_s']:,.0f}",
            f"{100 * r['mfu']:.1f} %",
            memory,
            f"{r['warmup_seconds']:.2f}" if "warmup_seconds" in r else "—",
            f"{r['tokens']:,}",
            ratio,
            *([f"{r['plan_peak_mb']:,.0f}" if "plan_peak_mb" in r else "—"] if planned else []),
        )
    return [gemm, paths]
