#!/usr/bin/env bash
# The beyond grid at its full schedules (whole backbones fine-tuned) on a GPU machine, several trials
# per GPU, over seeds 231, 1, 2, 3, 4: setup, the study, then the records, report and wall time copied
# to one folder to take home. Run from the repository root, with the data where --data / ORESTUDY_DATA
# says (default ../shared/data/minerals):
#
#   benchmarks/beyond_grid_gpu.sh                          # OUT=runs/beyond_grid_gpu, 4 trials per GPU
#   GPUS_PER_TRIAL=0.5 OUT=/tmp/out benchmarks/beyond_grid_gpu.sh
#   benchmarks/beyond_grid_gpu.sh --seeds 231 --epochs 1   # extra options go to replicate (a short run)
#   benchmarks/beyond_grid_gpu.sh --resume                 # the same command again continues it
#   GPUS_PER_TRIAL=0 VENV=/path/to/venv RUNS=/tmp/runs ... # a dry run on a CPU (GPUS_PER_TRIAL=0: no GPU asked)
#
# With GPUs asked for, the trials run with --device cuda: on a machine where torch sees no CUDA the
# script stops at once (Ray would wait for a GPU forever), and a trial never trains on the CPU unnoticed.
# The paper recipe (the table's reference row) runs here too, not reused from CPU records, so every
# row of the comparison ran on the same device and precision.
set -euo pipefail
OUT=${OUT:-runs/beyond_grid_gpu}
GPUS_PER_TRIAL=${GPUS_PER_TRIAL:-0.25}
NAME=${NAME:-beyond_grid_full}
RUNS=${RUNS:-runs}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/orestudy" ] || ./setup.sh
device=auto
if [ "$GPUS_PER_TRIAL" != 0 ]; then
    "$VENV/bin/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' || {
        echo "torch sees no CUDA GPU here: run this on a GPU machine, or GPUS_PER_TRIAL=0 for a CPU dry run" >&2
        exit 2
    }
    device=cuda
fi
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU seen by nvidia-smi"; nproc
  "$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'; } \
    > "$OUT/machine.txt"
start=$(date +%s)
set +e
"$VENV/bin/orestudy" replicate --grid experiments/beyond_grid.yaml --only full --seeds 231,1,2,3,4 \
    --gpus-per-trial "$GPUS_PER_TRIAL" --device "$device" --name "$NAME" --runs "$RUNS" "$@" 2>&1 | tee "$OUT/study.log"
status=${PIPESTATUS[0]}
set -e
echo "wall seconds: $(( $(date +%s) - start )), replicate exit status $status" | tee -a "$OUT/machine.txt"
cp "$RUNS/$NAME"/report/{trials.jsonl,report.md,full.csv,effects.md} "$OUT"/ 2>/dev/null || true
exit "$status"
