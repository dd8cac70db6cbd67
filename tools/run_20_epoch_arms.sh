#!/bin/bash
# The multiple-choice comparison's 20-epoch arms (issue "more tasks"), on the CPU, in the background:
# ARC-Easy loreft-20, then lora-20, then the same on OpenBookQA; both seeds side by side (--jobs 2).
# Every epoch is a checkpoint, so an interrupted call resumes where it stopped: run it again.
#   nohup bash tools/run_20_epoch_arms.sh >> runs/20-epoch-arms.log 2>&1 &
# Each arm runs from a snapshot of the committed code (tools/background_reproduce.sh). Reports:
#   heft reproduce CONFIG preset=full 'seeds=[1,2]' --output-dir DIR --report-only
set -eu
cd "$(dirname "$0")/.."
for task in arc_easy openbookqa; do
  # ARC-Easy's test split (2,376 questions) takes about 2/3 as long to evaluate as an epoch takes to
  # train on this CPU, so its long arms evaluate every 4th epoch; OpenBookQA's (500) is cheap.
  every=$([ "$task" = arc_easy ] && echo 4 || echo epoch)
  for arm in loreft-20 lora-20; do
    bash tools/background_reproduce.sh "configs/reproduce_$task.yaml" preset=full 'seeds=[1,2]' "arms_only=[$arm]" \
      "eval_every=$every" --output-dir "runs/reproduce-$task-full" --jobs 2 -q
  done
done
echo "$(date -u +%FT%TZ) all 20-epoch arms done"
