#!/bin/bash
# `heft reproduce` in the background on this machine's CPU, resumably, for runs longer than a session:
#   nohup bash tools/background_reproduce.sh CONFIG [KEY=VALUE ...] [--output-dir DIR --jobs 2 -q] >> runs/NAME.log 2>&1 &
# It runs a snapshot of the committed code (HEAD, in a temporary git worktree), so that editing the
# checkout does not change a run under way, at the lowest priority and one thread per job. Every epoch
# is a checkpoint: call it again with the same arguments to resume; finished arms are read back.
set -eu
cd "$(dirname "$0")/.."
export HEFT_DATA_DIR=${HEFT_DATA_DIR:-$(cd .. && pwd)/shared/data} OMP_NUM_THREADS=1
snapshot=$(mktemp -d /tmp/heft-code.XXXXXX)
trap 'rm -rf "$snapshot"; git worktree prune' EXIT
git worktree add --quiet -f --detach "$snapshot" HEAD
config=$1
shift
echo "$(date -u +%FT%TZ) start ($(git rev-parse --short HEAD)): $config $*"
PYTHONPATH="$snapshot/src" nice -n 19 .venv/bin/python -m heft reproduce "$snapshot/$config" "$@"
echo "$(date -u +%FT%TZ) done: $config $*"
