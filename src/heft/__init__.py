"""heft: hierarchical parameter-efficient fine-tuning (LoRA in weight space, then ReFT on hidden states).

The public names below are imported on first use, so `heft --help` does not pay for torch.
"""

import logging
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "HeftModel": "heft.pipeline",
    "LoraConfig": "heft.methods.lora",
    "ReftConfig": "heft.methods.reft",
    "RunConfig": "heft.config",
    "StageConfig": "heft.config",
    "config_from_dict": "heft.config",
    "load_config": "heft.config",
    "encode_pairs": "heft.api",
    "fit": "heft.api",
    "generate": "heft.api",
    "score": "heft.api",
    "export_run": "heft.io",
    "load_run": "heft.io",
    "save_run": "heft.io",
    "run_training": "heft.train",
}
__all__ = sorted(_EXPORTS)


class _DropUnusedKernelNotice(logging.Filter):
    """peft imports bitsandbytes whenever it is installed (peft/helpers.py), quantized run or not, and
    bitsandbytes 0.50 warns at import, on CPUs with AVX512-bf16, that the optional `kernels` package for
    its packed 4-bit CPU matmul is missing. heft never takes that path (`heft.quantize.prepare_loaded`
    switches the packing off: its kernel has no backward), so the notice is noise in every run's output.
    Only that message is dropped; bitsandbytes' other warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# set on the logger before bitsandbytes creates it (getLogger returns this object then), so the filter
# holds however heft's modules get imported
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropUnusedKernelNotice())


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'heft' has no attribute {name!r}")
