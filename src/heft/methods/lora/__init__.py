"""LoRA and DoRA stages, delegated to HF peft."""

from heft.methods.lora.config import LoraConfig
from heft.methods.lora.model import LoraAdapters, MaskBitsDropout, to_peft_config

__all__ = ["LoraAdapters", "LoraConfig", "MaskBitsDropout", "to_peft_config"]
