"""heft: hierarchical parameter-efficient fine-tuning (LoRA in weight space, then ReFT on hidden states)."""

__version__ = "0.1.0"
