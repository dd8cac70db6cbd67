"""heft: hierarchical parameter-efficient fine-tuning (LoRA in weight space, then ReFT on hidden states).

The public names below are imported on first use, so `heft --help` does not pay for torch.
"""

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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'heft' has no attribute {name!r}")
