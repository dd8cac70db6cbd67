#!/bin/bash
# Device call: `heft bench` on a randomly initialised Llama-2-7B-shaped model (configs/models/llama-2-7b,
# built in bf16 on the GPU; no weights or tokenizer to carry: synthetic token ids), heft's LoRA, LoReFT and
# joint paths beside transformers + peft (QLoRA on the 4-bit base), on a bf16 base and on a 4-bit (nf4) base,
# each with `heft plan`'s predicted peak. Carry `.whl` (heft's pinned wheels, as for bench_call.sh) and
# `.gpu7b/bnb.tgz` (bitsandbytes, used only when the image has none). A variant that would start after
# DEADLINE_S seconds is skipped, and each has its own time limit. Results: $OUT/bench7b-*.{json,txt}.
# A dry run on the CPU: CONFIG=folder-with-a-tiny-config.json DEVICE=cpu SHAPE="--batches 1 --batch-size 2
# --max-length 16" OUT=/tmp/out bash tools/device/bench_7b.sh
set -u
DEADLINE=${1:-480}
CONFIG=${CONFIG:-configs/models/llama-2-7b} DEVICE=${DEVICE:-cuda} SHAPE=${SHAPE:-"--batches 4 --batch-size 8 --max-length 512"}
T0=$(date +%s)
mkdir -p /tmp/site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HEFT_CACHE_DIR=/tmp/heft-cache
python3 -c "import bitsandbytes" 2>/dev/null || tar xzf .gpu7b/bnb.tgz -C /tmp/site || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep 'Model name';
  python3 -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)"; } 2>&1 | tee $OUT/machine.txt
echo "== random model ($(( $(date +%s) - T0 )) s)"
python3 tools/device/random_model.py $CONFIG /tmp/llama7b bfloat16 $DEVICE > $OUT/random_model.txt 2>&1 \
  || { tail -5 $OUT/random_model.txt; exit 2; }
source "$(dirname "$0")/deadline.sh"
bench() {  # NAME LIMIT_S ARGS...: one `heft bench` run, its table and JSON in $OUT
  local name=$1 limit=$2; shift 2
  run_before_deadline $name $limit $OUT/bench7b-$name.txt python3 -m heft bench --model /tmp/llama7b --device $DEVICE \
    --synthetic --plan --dtype bfloat16 $SHAPE --paths lora,peft-lora,loreft,joint --repeats 5 \
    --json $OUT/bench7b-$name.json "$@"
}
bench bf16 200
bench 4bit 240 --quantize 4
echo "bench_7b done at $(( $(date +%s) - T0 )) s"
