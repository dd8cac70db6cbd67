#!/usr/bin/env bash
# heft's own scores against lm-evaluation-harness's on the whole ARC-Easy test split (2,376
# questions), for a run's zero-shot base model and for the run itself:
#   bash docs/results/lm-eval/record.sh RUN_DIR
# Writes docs/results/lm-eval/record.json: acc and acc_norm from both, and on how many questions
# the two disagree (lm-eval's per-document samples against heft's per-example `correct`). The
# lm-eval files each call writes into the run folder stay there; earlier ones are left alone.
set -euo pipefail
run=$1
here=$(cd "$(dirname "$0")" && pwd)
heft=${HEFT:-heft}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for model in zero-shot trained; do
    flags=()
    [ "$model" = zero-shot ] && flags=(--zero-shot)
    $heft eval "$run" --split test --max-examples 100000 "${flags[@]}" > "$work/heft-$model.json"
    $heft eval "$run" --lm-eval arc_easy "${flags[@]}" > "$work/lm-eval-$model.txt"
    newest=$(ls -t "$run"/lm-eval-*[0-9].json | head -1)  # the file this call wrote
    cp "$newest" "$work/lm-eval-$model.json"
    cp "${newest%.json}-samples.jsonl" "$work/lm-eval-$model-samples.jsonl"
done
python - "$work" "$run" "$here/record.json" <<'PY'
import json, subprocess, sys
from pathlib import Path

work, run, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
record = {"run": run, "task": "arc_easy", "split": "test",
          "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
for model in ("zero-shot", "trained"):
    heft = json.loads((work / f"heft-{model}.json").read_text())
    lm = json.loads((work / f"lm-eval-{model}.json").read_text())["results"]["arc_easy"]
    samples = [json.loads(line) for line in (work / f"lm-eval-{model}-samples.jsonl").read_text().splitlines()]
    lm_correct = "".join(str(int(s["acc_norm"])) for s in sorted(samples, key=lambda s: s["doc_id"]))
    record[model] = {
        "n": heft["n"], "lm_eval_docs": len(samples),
        "heft": {"acc": heft["acc"], "acc_norm": heft["acc_norm"]},
        "lm_eval": {"acc": lm["acc,none"], "acc_norm": lm["acc_norm,none"]},
        "acc_norm_difference_points": round(100 * (lm["acc_norm,none"] - heft["acc_norm"]), 4),
        "questions_scored_differently": sum(a != b for a, b in zip(lm_correct, heft["correct"])),
    }
out.write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps(record, indent=2))
PY
