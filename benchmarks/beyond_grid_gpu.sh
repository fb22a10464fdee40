#!/usr/bin/env bash
# The beyond grid at its full schedules (whole backbones fine-tuned) on a GPU machine, several trials
# per GPU, over seeds 231, 1, 2, 3, 4: setup, the study, then the records, report and wall time copied
# to one folder to take home. Run from the repository root, with the data where --data / ORESTUDY_DATA
# says (default ../shared/data/minerals):
#
#   benchmarks/beyond_grid_gpu.sh                          # OUT=runs/beyond_grid_gpu, 4 trials per GPU
#   GPUS_PER_TRIAL=0.5 OUT=/tmp/out benchmarks/beyond_grid_gpu.sh
#   benchmarks/beyond_grid_gpu.sh --seeds 231 --epochs 1   # extra options go to replicate (a dry run)
#
# The paper recipe (the table's reference row) runs here too, not reused from CPU records, so every
# row of the comparison ran on the same device and precision.
set -euo pipefail
OUT=${OUT:-runs/beyond_grid_gpu}
GPUS_PER_TRIAL=${GPUS_PER_TRIAL:-0.25}
NAME=${NAME:-beyond_grid_full}
[ -x .venv/bin/orestudy ] || ./setup.sh
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU seen by nvidia-smi"; nproc; } \
    > "$OUT/machine.txt"
start=$(date +%s)
set +e
.venv/bin/orestudy replicate --grid experiments/beyond_grid.yaml --only full --seeds 231,1,2,3,4 \
    --gpus-per-trial "$GPUS_PER_TRIAL" --name "$NAME" --runs runs "$@" 2>&1 | tee "$OUT/study.log"
status=${PIPESTATUS[0]}
set -e
echo "wall seconds: $(( $(date +%s) - start )), replicate exit status $status" | tee -a "$OUT/machine.txt"
cp runs/"$NAME"/report/{trials.jsonl,report.md,full.csv,effects.md} "$OUT"/ 2>/dev/null || true
exit "$status"
