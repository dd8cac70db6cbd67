#!/bin/bash
# Issue 21's next device lease, in the two calls the 64 MiB carry limit needs (see README.md "Next lease"):
#   bash tools/device/next_lease.sh bench DEADLINE_S   (carry .whl and .gpu1)
#   bash tools/device/next_lease.sh boolq DEADLINE_S   (carry .gpu2; the machine must still be warm)
# bench: bench_call.sh's set-up (stash, wheels, random-weight smollm2-135m), then `heft bench` at 64 × 512
#        eager and with `compile: reduce-overhead` on bucketed batches (one call per path, so that a path
#        cut off by its limit leaves the others' JSON), then the `--jobs` scaling (jobs_scaling.py).
# boolq: full BoolQ, the 3-epoch arms that answer the README's open question (identity HEFT against LoRA-3
#        and joint-3), via reproduce_call.sh. Nothing starts after DEADLINE_S; every step has its own limit.
set -u
PHASE=${1:?bench or boolq}
DEADLINE=${2:?seconds}
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
step() {  # NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, time left), its output in $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  local l=$(left)
  [ $l -gt 20 ] || { echo "skipped $name: deadline"; return; }
  [ $limit -lt $l ] || limit=$l
  echo "== $name (limit $limit s, at $(( $(date +%s) - T0 )) s)"
  timeout $limit "$@" 2>&1 | grep -v '^Loading\|^Writing' > $OUT/$name.txt; echo "exit ${PIPESTATUS[0]}" >> $OUT/$name.txt
  tail -12 $OUT/$name.txt
}
bench() {  # NAME LIMIT_S ARGS...: `heft bench` on the random model at 64 × 512
  local name=$1 limit=$2; shift 2
  step bench-$name $limit python3 -m heft bench --model /tmp/gpu/randmodel --device cuda --batches 6 \
    --batch-size 64 --max-length 512 --repeats 3 --json $OUT/bench-$name.json "$@"
}
case $PHASE in
bench)
  mkdir -p .gpu1 && cp tools/device/random_model.py tools/device/bench_call.sh tools/device/deadline.sh .gpu1/
  bash .gpu1/bench_call.sh 0 || exit $?  # deadline 0: the set-up only, no bench variant
  export PYTHONPATH=/tmp/site:$PWD/src HEFT_DATA_DIR=/tmp/gpu/data PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  # eager and unbucketed, as the committed H200 records it is compared with
  bench 64x512-eager 60 --paths lora,peft-lora,loreft,joint --pad-to-multiple-of 1
  step jobs-scaling 110 python3 tools/device/jobs_scaling.py --model /tmp/gpu/randmodel --jobs 1,4,8 --seconds 15 \
    --json $OUT/jobs-scaling.json
  bench 64x512-graphs-lora 130 --paths lora,peft-lora --compile reduce-overhead
  bench 64x512-graphs-loreft 60 --paths loreft --compile reduce-overhead
  bench 64x512-graphs-joint 130 --paths joint --compile reduce-overhead
  ;;
boolq)
  mkdir -p .gpu2 && cp tools/device/reproduce_call.sh .gpu2/
  TASKS=boolq COMMON="preset=full seeds=[1]" TWENTY= JOBS_boolq=${JOBS_boolq:-3} \
    THREE='arms_only=[heft-2+1,heft-2+1-identity,lora-3,joint-3]' bash .gpu2/reproduce_call.sh $(( $(left) - 40 ))
  ;;
*) echo "unknown phase $PHASE: bench or boolq"; exit 2 ;;
esac
echo "$PHASE done at $(( $(date +%s) - T0 )) s"
