"""heft: hierarchical parameter-efficient fine-tuning (LoRA in weight space, then ReFT on hidden states)."""

__version__ = "0.1.0"

from heft.api import encode_pairs, fit, generate, score  # noqa: E402
from heft.config import RunConfig, StageConfig, config_from_dict, load_config  # noqa: E402
from heft.io import export_run, load_run, save_run  # noqa: E402
from heft.methods.lora import LoraConfig  # noqa: E402
from heft.methods.reft import ReftConfig  # noqa: E402
from heft.pipeline import HeftModel  # noqa: E402
from heft.train import run_training  # noqa: E402

__all__ = [
    "HeftModel",
    "LoraConfig",
    "ReftConfig",
    "RunConfig",
    "StageConfig",
    "config_from_dict",
    "encode_pairs",
    "export_run",
    "fit",
    "generate",
    "load_config",
    "load_run",
    "run_training",
    "save_run",
    "score",
]
