"""`heft plan`: the memory each stage of a run needs, from the model's config alone (no weights read).

How it is measured: the model is built on the meta device from its `config.json`, the stages before
the planned one are added and finished (merged) as `heft train` does, and the forward and backward
pass of one training step of the planned stage run on fake tensors, AdamW's state alive: torch's
`FakeTensorMode` runs every operator for its output's shape and dtype only, on a fake CPU device, so
bf16 autocast, LoRA's dropout copies, ReFT's gathers, the attention kernel's saved tensors and
activation checkpointing's recomputation all behave as in a real step while nothing is allocated. A
dispatch mode counts the bytes of every tensor storage alive at each operator; its maximum is the
step's peak. So the plan follows heft's code, not a formula that must be kept in step with it. The
cost is per operator, not per byte: when the decoder layers are alike, models of two and three
layers are traced and the line extended to the real depth (`traced_depth`).

What the trace cannot run, and how it is accounted for:
- The LM head's input is selected with a boolean mask of the target positions (`HeftModel.forward`),
  a shape that depends on data; the trace applies the same head to `target_tokens` positions per
  example, selected by a slice of the same size.
- A quantized base (`weight_bits` 4 or 8, bitsandbytes' nf4/int8 layout) is traced with its
  `compute_dtype` weights, then its decoder's linear weights are counted at `weight_bits` plus the
  quantization constants (nf4: one float32 absmax per block of 64 weights, 0.5 bit per weight; int8:
  one float32 scale per output row), and one dequantized weight (the largest) is added to the peak:
  bitsandbytes dequantizes a layer's weight for each matmul and saves no activation for it.
- Dropout: CUDA's fused kernel keeps a one-byte mask for the backward pass, the CPU's a copy of its
  noise in the input's dtype; CUDA plans swap the former in (`use_fused_dropout`).
- The attention kernel: on the CPU heft trains sequences up to 128 tokens with SDPA's math kernel
  (it keeps the B·H·T² scores) and longer ones with flash (it keeps the output and log-sum-exp); the
  trace runs the same kernels. On CUDA, flash or memory-efficient attention keeps the same tensors
  as the CPU flash kernel; for sequences up to 128 the trace keeps math's scores, at most as large
  as the keys and values, so a CUDA plan at short lengths errs on the safe side.

Evaluation is not planned: it runs without gradients, so nothing is kept for a backward pass and its
peak at `eval_batch_size` stays below a training step's at the same shape (the CPU comparison's
measured peaks include `heft train`'s evaluations).

What a measurement adds on top (why the plan reserves `HEADROOM`): CUDA's context, cuBLAS workspaces
and the caching allocator's free blocks are not in `torch.cuda.max_memory_allocated`, the number the
GPU bench records hold; on the CPU, the process's libraries, its data and the allocator's retained
pages are in the resident set. `tests/test_memory_plan.py` compares plans with both: with the GPU
bench records (CUDA max allocated, weights included) and with the CPU peak RSS of `heft train` above
the RSS of the process before the model loads.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from heft.config import RunConfig, StageConfig
from heft.evaluate import autocast
from heft.models import ALIASES, LoadedModel, ModelNotFoundError, cache_root, decoder_layers, resolve_dtype
from heft.pipeline import HeftModel

GIB = 2**30
HEADROOM = 0.9
"""Fraction of a device's memory a plan may fill: the rest is for what the peak does not count (CUDA
context and workspaces, allocator fragmentation, on the CPU the process's own libraries)."""
STANDARD_GPUS_GB = (24, 40, 80)
"""GPU memory sizes every plan states a verdict for (a 24 GB consumer card, A100 40 GB, 80 GB cards)."""
QUANT_OVERHEAD_BITS = {4: 32 / 64}
"""Bits per weight of a quantized layout's constants: nf4/fp4 store one float32 absmax per 64 weights.
int8 stores one float32 scale per output row (computed per layer in `_quantized_bytes`)."""
LINE_DEPTHS = (2, 3)
"""The depths traced to extend a line to the model's depth (`traced_depth`). Not 1: the first layer
differs when its input needs no gradient (a ReFT stage's first edit is at its output)."""
_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])i?b?)?\s*", re.IGNORECASE)
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


# ------------------------------------------------------------------------------------------- input
def parse_memory(text: str) -> int:
    """Bytes in `24GB`, `24 GiB`, `80G`, `40000MB` or `24` (GB). A GPU's "GB" is taken as GiB, as GPU
    makers count it (a "24 GB" card holds 24 GiB)."""
    match = _MEMORY.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not an amount of memory such as 24GB, 40 GiB or 80000MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "g").lower()])


@dataclass(frozen=True)
class Device:
    """What the plan is for: the kind of device (which attention kernels run) and its memory."""

    kind: str
    """cpu or cuda."""
    memory: int | None
    """Bytes of memory; None when unknown (no verdict, no largest batch)."""
    label: str

    @property
    def usable(self) -> int | None:
        return None if self.memory is None else int(self.memory * HEADROOM)


def resolve_device(device: str | None, gpu_memory: str | None) -> Device:
    """`--gpu-memory` (a CUDA device of that size), else `--device` (its memory is read), else the first
    GPU if there is one, else this machine's CPU and RAM."""
    if gpu_memory is not None:
        try:
            size = parse_memory(gpu_memory)
        except ValueError as err:
            raise ValueError(f"--gpu-memory: {err}") from err
        return Device("cuda", size, f"a GPU with {size / GIB:.0f} GiB")
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(name).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device here; give its size with --gpu-memory instead")
        props = torch.cuda.get_device_properties(torch.device(name))
        return Device("cuda", props.total_memory, f"{name} ({props.name}, {props.total_memory / GIB:.0f} GiB)")
    if kind != "cpu":
        raise ValueError(f"--device {name}: plans are for cpu or cuda devices")
    ram = meminfo_bytes()
    return Device("cpu", ram, "cpu" + (f" ({ram / GIB:.0f} GiB RAM)" if ram else ""))


def meminfo_bytes(field: str = "MemTotal") -> int | None:
    """A /proc/meminfo field in bytes (MemTotal: the machine's RAM; MemAvailable: what can be had now)."""
    try:
        line = next(s for s in Path("/proc/meminfo").read_text().splitlines() if s.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def model_config(name_or_path: str) -> Any:
    """The transformers config of an alias, a model folder, a `config.json` file or a hub id; no
    weights are read (an alias not yet converted is read from its GGUF file's metadata)."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    try:
        if name_or_path in ALIASES:
            return _alias_config(name_or_path)
        if path.is_file():
            return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else name_or_path)
    except OSError as err:
        raise ModelNotFoundError(f"could not read the config of model {name_or_path!r}: {err}") from err


def _alias_config(alias: str) -> Any:
    from transformers import AutoConfig

    converted = cache_root() / "models" / alias
    if (converted / "config.json").is_file():
        return AutoConfig.from_pretrained(converted)
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(f"model alias {alias!r} needs the package {spec.pip_name}")
    return AutoConfig.from_pretrained(found.submodule_search_locations[0], gguf_file=spec.filename)


# ------------------------------------------------------------------------------------------- trace
class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, counted at every operator, and their maximum.

    A storage counts from the operator that creates it until Python frees it (views share their
    base's storage and count once). Storages that exist before are registered with `hold`."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def hold(self, tensors: Iterator[torch.Tensor]) -> None:
        for tensor in tensors:
            self._track(tensor.untyped_storage())

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.now += self.sizes[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage())
        return out


def use_fused_dropout(model: nn.Module) -> None:
    """Dropout as CUDA runs it, for CUDA plans: its fused kernel keeps a one-byte mask for the backward
    pass, where the CPU's keeps its noise as a tensor of the input's dtype (LoRA's dropout on every
    adapted layer's input: 14.7 of 47.7 GB in smollm2's LoRA step at 64 × 512 on the CPU). Set on the
    modules, not around the call: activation checkpointing recomputes them in the backward pass."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.forward = functools.partial(_native_dropout, module)


def _native_dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    if not module.training or module.p == 0:
        return x
    return torch.ops.aten.native_dropout(x, module.p, True)[0]


@dataclass
class StepTrace:
    """Bytes of one traced training step; `static` is what exists outside any step."""

    static: int
    """Weights, buffers, optimizer state."""
    copies: int
    """bf16 copies of the frozen float32 weights, held while a stage trains under bf16 autocast."""
    activations: int
    """Alive when the forward pass ends (what backward needs), minus the copies and the logits."""
    logits: int
    """Created by the LM head and the loss: the logits at target positions and their float32 copy."""
    peak: int
    """Maximum over the step, static included."""
    optimizer: int
    """AdamW's state (part of `static`)."""


def _fakify(model: nn.Module, fake: Any) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor of the same shape and dtype,
    keeping shared (tied) tensors shared."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    with fake:
                        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    made[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if wrap else empty
                table[name] = made[id(tensor)]


def _target_loss(model: HeftModel, hidden: torch.Tensor, targets: int) -> torch.Tensor:
    """`HeftModel.forward`'s loss with the head on `targets` positions per example, as a slice (its
    boolean mask would give the same shapes, which fake tensors cannot derive from data)."""
    width = hidden.shape[1]
    selected = hidden[:, width - 1 - targets : width - 1].reshape(-1, hidden.shape[-1])
    logits = model.lm_head(selected).float()
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def trace_step(
    model: HeftModel,
    batch_size: int,
    length: int,
    targets: int,
    bf16: bool,
    checkpointing: bool,
    device_kind: str = "cpu",
) -> StepTrace:
    """The forward and backward pass of one training step of `model`'s last stage, on fake tensors,
    as `train_stage` runs it, with AdamW's state (two float32 tensors per trainable one) alive.

    The optimizer step itself is not traced: it runs after the backward pass, holding the gradients
    and a few parameter-sized temporaries, far below the backward pass's peak. `device_kind` cuda
    runs dropout as CUDA does (`use_fused_dropout`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode()
    _fakify(model, fake)
    if checkpointing:
        model.enable_activation_checkpointing()
    if device_kind == "cuda":
        use_fused_dropout(model)
    live = LiveBytes()
    with fake:
        state = [torch.zeros_like(p) for p in model.trainable_parameters() for _ in range(2)]
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        mask = torch.ones(batch_size, length, dtype=torch.long)
        live.hold(iter(state))
        optimizer = live.now
        live.hold(t for t in [*model.parameters(), *model.buffers()])
        static = live.now
        model.train()
        with live, model.frozen_weights_bf16(bf16):
            copies = live.now - static
            with autocast(model, bf16):
                hidden = model(ids, mask, mask.bool()).hidden_states
                before_head = live.now
                loss = _target_loss(model, hidden, targets)
            logits = live.now - before_head
            activations = live.now - static - copies - logits
            loss.backward()
    return StepTrace(static, copies, activations, logits, live.peak, optimizer)


# -------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Weights:
    """How the base weights are stored: in `dtype` (float32 or bfloat16), or quantized."""

    dtype: str
    bits: int | None = None
    """4 or 8: the decoder's frozen linear weights quantized (bitsandbytes' layout), computed in `dtype`."""

    @property
    def label(self) -> str:
        return f"{self.bits}-bit base ({self.dtype} compute)" if self.bits else f"{self.dtype} weights"


@dataclass
class StagePlan:
    """One stage's memory at the run's batch shape, without and with activation checkpointing (bytes)."""

    name: str
    method: str
    weights: dict[str, int]
    """Per storage kind: float32, bfloat16, 4-bit (packed weights and their constants)..."""
    copies: int
    """bf16 copies of frozen float32 weights held while the stage trains (bf16 autocast)."""
    adapter: int
    """The stage's trainable parameters (part of `weights`)."""
    gradients: int
    optimizer: int
    activations: int
    """Kept for the backward pass when the forward pass ends (logits excluded)."""
    logits: int
    """The LM head's output at target positions, in its dtype and as float32 for the loss."""
    peak: int
    activations_checkpointed: int
    peak_checkpointed: int
    fixed: int
    """The part of the peak that does not grow with the batch: weights, optimizer state, bf16 copies."""

    def largest_batch(self, budget: int, planned_batch: int, checkpointing: bool) -> int:
        """The largest batch whose peak stays within `budget` (0: not one example). Everything but
        `fixed` grows linearly with the batch, as every operator of a step works per example (the
        gradients are counted with it, which errs on the safe side)."""
        per_example = ((self.peak_checkpointed if checkpointing else self.peak) - self.fixed) / planned_batch
        return max(0, int((budget - self.fixed) // max(per_example, 1.0)))


@dataclass
class Plan:
    """A run's stages at its batch shape on one device, plus the same stages under other weights."""

    model: str
    architecture: str
    parameters: int
    batch_size: int
    length: int
    target_tokens: int
    bf16: bool
    weights: Weights
    device: Device
    stages: list[StagePlan]
    alternatives: dict[Weights, list[StagePlan]] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    @property
    def peak_checkpointed(self) -> int:
        return max(s.peak_checkpointed for s in self.stages)

    def largest_batch(self, stages: Sequence[StagePlan], budget: int, checkpointing: bool) -> int:
        """The largest batch every stage fits in `budget` with."""
        return min(s.largest_batch(budget, self.batch_size, checkpointing) for s in stages)


def plan_run(
    cfg: RunConfig,
    device: Device,
    target_tokens: int = 1,
    weight_bits: int | None = None,
    compute_dtype: str = "bfloat16",
    alternatives: bool = True,
) -> Plan:
    """Plan every stage of `cfg` at `batch_size × max_length` on `device`.

    `weight_bits` (4 or 8) plans a quantized frozen base computed in `compute_dtype`, as a run's
    `quantize:` block loads it; `alternatives` adds the same stages with bf16 weights and 8- and
    4-bit bases (one more trace per stage when the run's weights are float32)."""
    if weight_bits not in (None, 4, 8):
        raise ValueError(f"weight_bits {weight_bits}: a quantized base has 4 or 8 bits")
    if target_tokens < 1 or cfg.max_length <= target_tokens:
        raise ValueError(f"target tokens {target_tokens}: at least 1 and fewer than max_length {cfg.max_length}")
    config = model_config(cfg.model)
    chosen = Weights(compute_dtype, weight_bits) if weight_bits else Weights(cfg.dtype)
    options = [chosen]
    if alternatives:
        others = (Weights("bfloat16"), Weights(compute_dtype, 8), Weights(compute_dtype, 4))
        options += [w for w in others if w != chosen]
    traces = {}
    plans = {}
    for option in options:
        if option.dtype not in traces:
            traces[option.dtype] = _trace_stages(config, cfg, option.dtype, target_tokens, device.kind)
        plans[option] = [_stage_plan(model, plain, ckpt, option) for model, plain, ckpt in traces[option.dtype]]
    some_model = traces[chosen.dtype][0][0]
    return Plan(
        model=cfg.model,
        architecture=(getattr(config, "architectures", None) or [type(some_model.model).__name__])[0],
        parameters=sum(p.numel() for p in _unique(some_model.parameters()) if not p.requires_grad),
        batch_size=cfg.batch_size,
        length=cfg.max_length,
        target_tokens=target_tokens,
        bf16=cfg.bf16,
        weights=chosen,
        device=device,
        stages=plans.pop(chosen),
        alternatives=plans,
    )


def _trace_stages(
    config: Any, cfg: RunConfig, dtype: str, targets: int, device_kind: str
) -> list[tuple[HeftModel, StepTrace, StepTrace]]:
    """Each stage's meta model and its step traced without and with activation checkpointing."""
    out = []
    for index, stage in enumerate(cfg.stages):
        runs = [
            traced_depth(config, dtype, cfg.stages[:index], stage, cfg, targets, checkpointing, device_kind)
            for checkpointing in (False, True)
        ]
        out.append((meta_model(config, dtype, cfg.stages[:index], stage), *runs))
    return out


def traced_depth(
    config: Any,
    dtype: str,
    before: Sequence[StageConfig],
    stage: StageConfig,
    cfg: RunConfig,
    targets: int,
    checkpointing: bool,
    device_kind: str,
) -> StepTrace:
    """The step's trace at the model's depth. When every decoder layer is alike (same attention, every
    stage on all layers), a step's bytes are an affine function of the depth: each layer adds the same
    weights, saved activations and, in the backward pass, the same gradients at the same moment. Then
    models of `LINE_DEPTHS` layers are traced and the line extended to the real depth: five layers'
    tracing instead of all of them (smollm2's 30 layers: equal to the full trace to the byte for its
    LoRA and LoReFT stages; `tests/test_memory_plan.py` checks it on a small model)."""
    depth = config.get_text_config().num_hidden_layers

    def trace(layers: int) -> StepTrace:
        model = meta_model(with_depth(config, layers), dtype, before, stage)
        return trace_step(model, cfg.batch_size, cfg.max_length, targets, cfg.bf16, checkpointing, device_kind)

    low, high = LINE_DEPTHS
    if depth <= high or not layers_alike(config, [*before, stage]):
        return trace(depth)
    at_low, at_high = trace(low), trace(high)
    return StepTrace(
        **{
            f.name: getattr(at_low, f.name) + (depth - low) * (getattr(at_high, f.name) - getattr(at_low, f.name))
            for f in fields(StepTrace)
        }
    )


def layers_alike(config: Any, stages: Sequence[StageConfig]) -> bool:
    """Whether every decoder layer gets the same modules: one attention type, no stage limited to
    some layers."""
    kinds = getattr(config.get_text_config(), "layer_types", None)
    if kinds is not None and len(set(kinds)) > 1:
        return False
    return all(
        (not s.uses_lora or s.lora.layers_to_transform is None) and (not s.uses_reft or s.reft.layers == "all")
        for s in stages
    )


def with_depth(config: Any, layers: int) -> Any:
    """A copy of `config` with `layers` decoder layers."""
    shallow = copy.deepcopy(config)
    text = shallow.get_text_config()
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    return shallow


def meta_model(config: Any, dtype: str, before: Sequence[StageConfig], stage: StageConfig) -> HeftModel:
    """A HeftModel on the meta device with the stages `before` added and finished (LoRA merged as
    configured), then `stage` added: the model that stage trains."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    heft = HeftModel(LoadedModel(model.eval(), None, str(getattr(config, "_name_or_path", "")), "", []))
    for previous in before:  # outside the meta context: ReFT initialises its (small) rotations for real
        heft.add_stage(previous)
        heft.finish_stage()
    heft.add_stage(stage)
    return heft


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    """Tied tensors (an LM head sharing the embedding) once."""
    return list({id(t): t for t in tensors}.values())


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stage_plan(model: HeftModel, plain: StepTrace, ckpt: StepTrace, option: Weights) -> StagePlan:
    """A stage's plan from its traces, with the frozen linear weights re-counted for a quantized base."""
    weights, change = _weight_bytes(model, option)
    trainable = _nbytes(model.trainable_parameters())
    stage = model.stages[-1]
    return StagePlan(
        name=stage.name,
        method=stage.config.method,
        weights=weights,
        copies=plain.copies,
        adapter=trainable,
        gradients=trainable,
        optimizer=plain.optimizer,
        activations=plain.activations,
        logits=plain.logits,
        peak=plain.peak + change,
        activations_checkpointed=ckpt.activations,
        peak_checkpointed=ckpt.peak + change,
        fixed=plain.static + plain.copies + change,
    )


def _weight_bytes(model: HeftModel, option: Weights) -> tuple[dict[str, int], int]:
    """The weights per storage kind, and what a quantized base changes in the traced bytes: packed
    weights instead of `compute_dtype` ones, plus one dequantized weight (the largest) at a time."""
    quantized = _quantizable_weights(model) if option.bits else []
    skip = {id(w) for w in quantized}
    by_kind: dict[str, int] = {}
    for param in _unique(model.parameters()):
        if id(param) not in skip:
            kind = str(param.dtype).removeprefix("torch.")
            by_kind[kind] = by_kind.get(kind, 0) + param.numel() * param.element_size()
    if not quantized:
        return by_kind, 0
    packed = sum(_quantized_bytes(w, option.bits) for w in quantized)
    by_kind[f"{option.bits}-bit"] = packed
    return by_kind, packed - _nbytes(quantized) + max(_nbytes([w]) for w in quantized)


def _quantizable_weights(model: HeftModel) -> list[torch.Tensor]:
    """The frozen linear weights of the decoder blocks, which bitsandbytes quantizes (the LM head,
    embeddings, norms, adapters and interventions stay in the compute dtype)."""
    found = [
        module.weight
        for layer in decoder_layers(model.model)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and "lora_" not in name and not module.weight.requires_grad
    ]
    return _unique(iter(found))


def _quantized_bytes(weight: torch.Tensor, bits: int) -> int:
    """Packed weights and their constants: nf4 one float32 absmax per 64 weights, int8 one float32
    scale per output row."""
    if bits == 4:
        return math.ceil(weight.numel() * (4 + QUANT_OVERHEAD_BITS[4]) / 8)
    return weight.numel() + 4 * weight.shape[0]


# ------------------------------------------------------------------------------------------ report
DEFAULT_CONTINUATION_TOKENS = 32
"""Loss tokens per example planned for continuation tasks (phrase answers) unless told: more than the
answers of ARC or OpenBookQA tokenise to, so the logits are not under-planned."""


def default_target_tokens(task: Any) -> int:
    """One loss token for first-token tasks (BoolQ's " yes"/" no"), else `DEFAULT_CONTINUATION_TOKENS`."""
    return 1 if task.scoring == "first_token" else DEFAULT_CONTINUATION_TOKENS


def size(n: int) -> str:
    """Bytes as GB (GiB, as the verdicts count them) from 1 GiB on, else MB."""
    return f"{n / GIB:.2f} GB" if abs(n) >= GIB else f"{n / 2**20:.0f} MB"


def verdict(plan: Plan, stages: Sequence[StagePlan], budget: int) -> str:
    """One cell of the what-fits table: the largest batch within `budget`, and whether it needs
    activation checkpointing."""
    plain = plan.largest_batch(stages, budget, checkpointing=False)
    checkpointed = plan.largest_batch(stages, budget, checkpointing=True)
    if plain >= plan.batch_size:
        return f"fits, batch ≤ {plain}"
    if checkpointed >= plan.batch_size:
        return f"checkpointing, batch ≤ {checkpointed}"
    if checkpointed:
        return f"batch ≤ {checkpointed} + checkpointing"
    return "does not fit"


def budgets(plan: Plan) -> dict[str, int]:
    """The memory sizes the what-fits table judges: `STANDARD_GPUS_GB` and the planned device's."""
    out = {f"{gb} GB": int(gb * GIB * HEADROOM) for gb in STANDARD_GPUS_GB}
    if plan.device.usable is not None and all(abs(plan.device.usable - b) > GIB // 2 for b in out.values()):
        out[plan.device.label] = plan.device.usable
    return out


def plan_tables(plan: Plan) -> list[Any]:
    """The per-stage table of the run as configured and the what-fits table of weight options."""
    from rich.table import Table

    usable = "" if plan.device.usable is None else f", {size(plan.device.usable)} usable ({HEADROOM:.0%})"
    stages = Table(
        title=f"{plan.model} ({plan.architecture}, {plan.parameters / 1e9:.2f} B frozen parameters), "
        f"{plan.weights.label}{', bf16 autocast' if plan.bf16 else ''}: batch {plan.batch_size} × {plan.length} "
        f"tokens, {plan.target_tokens} loss token(s) per example, on {plan.device.label}{usable}"
    )
    columns = ("stage", "weights", "bf16 copies", "adapter / grads / AdamW", "activations", "logits", "peak")
    for column in (*columns, "checkpointing: activations", "checkpointing: peak"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for s in plan.stages:
        stages.add_row(
            f"{s.name}",
            " + ".join(f"{size(n)} {kind}" for kind, n in s.weights.items()),
            size(s.copies),
            f"{size(s.adapter)} / {size(s.gradients)} / {size(s.optimizer)}",
            size(s.activations),
            size(s.logits),
            size(s.peak),
            size(s.activations_checkpointed),
            size(s.peak_checkpointed),
        )
    fits = Table(title=f"What fits (largest batch at {plan.length} tokens; a GPU's memory × {HEADROOM:.0%} usable)")
    for column in ("weights", "peak", "checkpointing: peak", *budgets(plan)):
        fits.add_column(column, justify="left" if column == "weights" else "right")
    for weights, options in {plan.weights: plan.stages, **plan.alternatives}.items():
        fits.add_row(
            weights.label,
            size(max(s.peak for s in options)),
            size(max(s.peak_checkpointed for s in options)),
            *(verdict(plan, options, budget) for budget in budgets(plan).values()),
        )
    return [stages, fits]


HOW = {"bfloat16 weights": "dtype: bfloat16", "8-bit base": "quantize.bits: 8", "4-bit base": "quantize.bits: 4"}
"""The config change behind each what-if row (a quantized base is the `quantize:` block)."""


def advice(plan: Plan) -> list[str]:
    """Whether the run fits the planned device as configured, and each change that would make it fit."""
    if plan.device.usable is None:
        return [f"peak {size(plan.peak)}; the device's memory is unknown (give --gpu-memory)"]
    budget = plan.device.usable
    plain_batch = plan.largest_batch(plan.stages, budget, checkpointing=False)
    if plan.peak <= budget:
        return [f"fits: peak {size(plan.peak)} of {size(budget)} usable; largest batch {plain_batch}"]
    lines = [f"does not fit: peak {size(plan.peak)} > {size(budget)} usable on {plan.device.label}"]
    if plain_batch:
        lines.append(f"- batch_size: {plain_batch} fits (raise grad_accum to keep the global batch)")
    if plan.peak_checkpointed <= budget:
        batch = plan.largest_batch(plan.stages, budget, checkpointing=True)
        lines.append(f"- activation_checkpointing: true fits (peak {size(plan.peak_checkpointed)}, batch ≤ {batch})")
    for weights, stages in plan.alternatives.items():
        if plan.largest_batch(stages, budget, checkpointing=True):
            how = next(v for k, v in HOW.items() if weights.label.startswith(k))
            lines.append(f"- {how} ({weights.label}): {verdict(plan, stages, budget)}")
    if len(lines) == 1:
        lines.append("- nothing planned here fits: a larger device or a shorter max_length")
    return lines
