"""PEFT methods heft can stack: one package per method (config, module, injection)."""
