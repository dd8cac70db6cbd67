"""LoRA and DoRA stages, delegated to HF peft."""

from heft.methods.lora.config import LoraConfig
from heft.methods.lora.model import LoraAdapters, to_peft_config

__all__ = ["LoraAdapters", "LoraConfig", "to_peft_config"]
