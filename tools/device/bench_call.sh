#!/bin/bash
# Device call 1: stash the first part of the GGUF and the data, install heft's pinned libraries,
# then `heft bench` on CUDA with a random-weight smollm2-135m (speed and memory do not depend on values):
# eager at 64 × 512, small launch-bound batches (16 × 64, the size of a multiple-choice training
# batch) eager and compiled, 64 × 512 with activation checkpointing, then CUDA graphs. A variant that would start after
# DEADLINE_S seconds is skipped, and each has its own time limit.
set -u
DEADLINE=${1:-300}
T0=$(date +%s)
mkdir -p /tmp/gpu && cp .gpu1/gguf.a /tmp/gpu/gguf.a && cp -r .gpu1/data /tmp/gpu/data || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HEFT_DATA_DIR=/tmp/gpu/data PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep 'Model name';
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)";
  python3 -c "import triton; print('triton', triton.__version__)"; } 2>&1 | tee $OUT/machine.txt
python3 .gpu1/random_model.py .gpu1/meta /tmp/gpu/randmodel > /dev/null 2>&1 || exit 2
source "$(dirname "$0")/deadline.sh"
bench() {  # NAME LIMIT_S ARGS...: one `heft bench` run, its table and JSON in $OUT
  local name=$1 limit=$2; shift 2
  run_before_deadline $name $limit $OUT/bench-$name.txt python3 -m heft bench --model /tmp/gpu/randmodel --device cuda \
    --batches 6 --json $OUT/bench-$name.json "$@"
}
bench 64x512 90 --batch-size 64 --max-length 512
bench 16x64 60 --batch-size 16 --max-length 64 --paths lora,peft-lora,loreft,joint
bench 16x64-compile 150 --batch-size 16 --max-length 64 --paths lora,loreft --compile default
bench 64x512-checkpointing 90 --batch-size 64 --max-length 512 --paths lora,peft-lora,loreft,joint --activation-checkpointing
bench 16x64-compile-cudagraphs 150 --batch-size 16 --max-length 64 --paths lora --compile reduce-overhead
echo "call1 done at $(( $(date +%s) - T0 )) s"
