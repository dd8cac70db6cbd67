"""A randomly initialised smollm2-135m (same shapes as the real one) for `heft bench`: throughput
and memory do not depend on the weights' values."""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

meta, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(meta), dtype=torch.float32)
model.save_pretrained(out)
for f in meta.iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
print("random model in", out)
