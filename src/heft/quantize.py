"""Quantized frozen bases (QLoRA's setting): the schema, what each backend can do, and the
bitsandbytes specifics heft relies on.

A quantized base stays frozen; adapters (LoRA through peft's bnb layers) and interventions train
in full precision on top. This module imports neither torch nor the backends at import time, so
that configs can be read (and refused) in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class QuantizeConfig:
    """Load the frozen base quantized (QLoRA); adapters and interventions train in full precision on top."""

    bits: int = 4
    """4 (bitsandbytes Linear4bit, `quant_type`) or 8 (LLM.int8(), Linear8bitLt, which computes in float16)."""
    backend: str = "bitsandbytes"
    """bitsandbytes (CPU and CUDA; `pip install heft[quantize]`). torchao is refused (see
    docs/guide/gpus-and-scale.md)."""
    quant_type: str = "nf4"
    """4-bit code book: nf4 (QLoRA's) or fp4. Ignored at 8 bits."""
    compute_dtype: str = "bfloat16"
    """Dtype the 4-bit layers compute in: bfloat16 or float16 (float32 is refused: it gives up the
    speed and memory a 4-bit base is for). Ignored at 8 bits."""


@dataclass(frozen=True)
class Backend:
    """What one quantization library can do for heft."""

    package: str
    """Import name, looked up (not imported) to tell whether it is installed."""
    install: str
    """What to run when it is missing."""
    devices: tuple[str, ...]
    """Device types its quantized layers run on."""
    requantizes: bool
    """Whether a LoRA update can be merged into its weights (dequantize → add → quantize again)."""


BACKENDS: dict[str, Backend] = {
    "bitsandbytes": Backend(
        "bitsandbytes", "pip install 'heft[quantize]' (bitsandbytes==0.50.2)", ("cpu", "cuda"), requantizes=True
    ),
}
REFUSED_BACKENDS: dict[str, str] = {
    "torchao": "heft does not run torchao bases: peft trains and merges LoRA only over torchao's int8 "
    "weight-only layers, and heft has not been tested with them",
}
"""Backends the schema names (the issue's interface) but heft refuses, with the reason."""


@dataclass(frozen=True)
class Problem:
    """A quantize setting that cannot run here: the key it concerns (under `quantize`, or a stage's
    `lora.merge`), what is wrong and how to fix it."""

    key: tuple[str | int, ...]
    problem: str
    hint: str


def device_type() -> str:
    """Where heft would run now: cuda when there is a GPU, else cpu (as `heft train` decides)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def problems(
    config: QuantizeConfig, device: str, merging_stages: Iterable[int] = (), dora_stages: Iterable[int] = ()
) -> list[Problem]:
    """Why `config` cannot run on `device` (a device type), with LoRA stages `merging_stages` merged into
    the base and DoRA stages `dora_stages`: checked before any weights load, so a bad combination costs
    a second, not a model load."""
    if config.backend in REFUSED_BACKENDS:
        reason = f"{config.backend}: {REFUSED_BACKENDS[config.backend]}"
        return [Problem(("quantize", "backend"), reason, "use bitsandbytes")]
    found = _environment_problems(config, device)
    if config.bits == 4 and config.compute_dtype == "float32":
        found.append(
            Problem(
                ("quantize", "compute_dtype"),
                "float32 with bits: 4 (a 4-bit base computes in 16 bits)",
                "use compute_dtype: bfloat16 (QLoRA's), or float16",
            )
        )
    if config.bits == 8:
        found += [
            Problem(
                ("stages", i, "method"),
                "DoRA over an 8-bit base fails in its first forward (peft 0.21 + bitsandbytes 0.50 lose the int8 "
                "state)",
                "use method: lora, or quantize.bits: 4",
            )
            for i in dora_stages
        ]
    if not BACKENDS[config.backend].requantizes:
        found += [
            Problem(
                ("stages", i, "lora", "merge"),
                f"true on a {config.backend} base, which cannot be requantized",
                "set lora.merge: false (the adapter stays beside the quantized base)",
            )
            for i in merging_stages
        ]
    return found


def _environment_problems(config: QuantizeConfig, device: str) -> list[Problem]:
    """What this machine lacks for `config`: the backend's package, or a device it runs on."""
    backend, key = BACKENDS[config.backend], ("quantize", "backend")
    found = []
    if importlib.util.find_spec(backend.package) is None:
        found.append(Problem(key, f"{config.backend} is not installed", backend.install + ", or remove quantize"))
    if device not in backend.devices:
        found.append(
            Problem(key, f"{config.backend} does not run on {device}", f"it runs on {', '.join(backend.devices)}")
        )
    return found


class QuantizeUnavailable(ValueError):
    """A run folder's quantization that cannot be rebuilt here (e.g. its backend is not installed)."""


def check_runnable(config: QuantizeConfig, where: str) -> None:
    """Raise QuantizeUnavailable naming `where` (e.g. a manifest) when `config` cannot load here."""
    found = problems(config, device_type())
    if found:
        first = found[0]
        raise QuantizeUnavailable(f"'{dotted(first.key)}' in {where}: {first.problem}; {first.hint}")


def dotted(key: Iterable[str | int]) -> str:
    return ".".join(map(str, key))


def as_record(config: QuantizeConfig | None) -> dict | None:
    """The manifest's form: plain JSON, None for a full-precision base."""
    return None if config is None else dataclasses.asdict(config)


def from_record(record: dict | None) -> QuantizeConfig | None:
    return None if record is None else QuantizeConfig(**record)


# ------------------------------------------------------------------------------------ bitsandbytes
def transformers_config(config: QuantizeConfig) -> Any:
    """The `quantization_config` transformers loads the base with."""
    import torch
    from transformers import BitsAndBytesConfig

    if config.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype),
    )


class _DropExpectedCast(logging.Filter):
    """LLM.int8() computes in float16 by design; bitsandbytes logs that at every 8-bit matmul."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def prepare_loaded(model: Any) -> None:
    """Make a freshly loaded bitsandbytes model safe to train on the CPU.

    bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel at the first forward
    without gradients (evaluation), and that kernel has no backward: gradients reaching earlier
    layers through it are silently wrong (measured: a LoRA gradient in layer 0 fell to 6 % of its
    value). heft evaluates before and between stages, so the repacking is switched off; at heft's
    batch sizes the packed kernel was only 1.2x faster (16 × 200 tokens, one 576 × 1536 layer).
    """
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropExpectedCast())
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
