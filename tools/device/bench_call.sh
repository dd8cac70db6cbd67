#!/bin/bash
# Device call 1: stash the first part of the GGUF and the data, install heft's pinned libraries,
# then `heft bench` on CUDA with a random-weight smollm2-135m (speed and memory do not depend on values).
set -u
mkdir -p /tmp/gpu && cp .gpu1/gguf.a /tmp/gpu/gguf.a && cp -r .gpu1/data /tmp/gpu/data || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HEFT_DATA_DIR=/tmp/gpu/data PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep 'Model name';
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"; } 2>&1 | tee $OUT/machine.txt
python3 .gpu1/random_model.py .gpu1/meta /tmp/gpu/randmodel > /dev/null 2>&1 || exit 2
for shape in 64x512 16x256; do
  timeout 110 python3 -m heft bench --model /tmp/gpu/randmodel --device cuda --batch-size ${shape%x*} --max-length ${shape#*x} \
     --batches 6 --json $OUT/bench-$shape.json 2>&1 | grep -v '^Loading\|^Writing' | tee $OUT/bench-$shape.txt
done
echo "call1 done"
