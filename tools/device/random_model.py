"""A randomly initialised model of the shapes in META/config.json, for `heft bench`: throughput and memory
do not depend on the weights' values. Every other file in META (a tokenizer) is copied beside it.

    python random_model.py META OUT [DTYPE [DEVICE]]

DTYPE (default float32) and DEVICE (default cpu): a 7B-shaped model is built in bfloat16 on the GPU,
where its initialisation takes seconds, not the minutes of a CPU (tools/device/bench_7b.sh)."""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

meta, out = Path(sys.argv[1]), Path(sys.argv[2])
dtype = getattr(torch, sys.argv[3] if len(sys.argv) > 3 else "float32")
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
torch.manual_seed(0)
with torch.device(device):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(meta), dtype=dtype)
model.save_pretrained(out)
for f in meta.iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
print("random model in", out)
