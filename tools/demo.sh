#!/usr/bin/env bash
# The whole pipeline in one command, on a CPU (about 10 minutes on 2 idle cores, once set up):
#   1. sets up .venv/ (tools/setup_env.sh; seconds when it is already there),
#   2. writes the shapes data set to data/shapes/ (tools/make_shapes_dataset.py),
#   3. trains RetinaNet + ConvMLP-S on it from scratch (tools/train.py; the log shows the
#      losses, the ETA and the validation mAP),
#   4. evaluates the trained model on the validation split (tools/test.py),
#   5. draws its predictions on validation images and plots the loss and mAP over training
#      (tools/demo_pictures.py), printing where the pictures are.
# Environment: WORK_DIR (default work_dirs/demo_retinanet). The data goes to data/shapes/,
# where the demo configs look for it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

config=configs/detection/retinanet_convmlp_s_shapes.py
work_dir=${WORK_DIR:-work_dirs/demo_retinanet}
data=data/shapes
py=.venv/bin/python
step() { printf '\n==== %s ====\n' "$*"; }
# PyTorch runs one thread per core. On a machine that is busy with other work, its threads
# wait on each other and a training step can get many times slower: use the cores that are
# idle now (measured over one second; the load average lags by minutes after a finished job).
cpu_ticks() {  # idle (idle + iowait) and total ticks of all cores since boot
  awk '/^cpu /{t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t}' /proc/stat
}
idle_cores() {
  local cores=$(nproc) idle1 total1 idle2 total2
  read -r idle1 total1 < <(cpu_ticks)
  sleep 1
  read -r idle2 total2 < <(cpu_ticks)
  awk -v c="$cores" -v di=$((idle2 - idle1)) -v dt=$((total2 - total1)) \
    'BEGIN { n = dt > 0 ? int(c * di / dt + 0.5) : c; print (n > 1 ? n : 1) }'
}

step "1/5 environment (tools/setup_env.sh)"
bash tools/setup_env.sh

step "2/5 data: $data"
"$py" tools/make_shapes_dataset.py --out "$data"

if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(idle_cores)
  export OMP_NUM_THREADS
fi
step "3/5 training $config (from scratch, $OMP_NUM_THREADS thread(s); work dir $work_dir)"
start=$(date +%s)
"$py" tools/train.py "$config" --work-dir "$work_dir"
train_s=$(( $(date +%s) - start ))
checkpoint=$(cat "$work_dir/last_checkpoint")

step "4/5 evaluation of $checkpoint on the validation images"
"$py" tools/test.py "$config" "$checkpoint" --work-dir "$work_dir/test" \
  | tee "$work_dir/test.log"

step "5/5 pictures"
"$py" tools/demo_pictures.py "$config" "$work_dir" --checkpoint "$checkpoint" \
  --out "$work_dir/pictures"

printf '\nDone: trained in %d s. Model: %s\n' "$train_s" "$checkpoint"
printf 'Training log: %s\n' "$(ls -t "$work_dir"/*/*.log | head -1)"
printf 'COCO box mAP on the validation split: %s\n' \
  "$(grep -o 'coco/bbox_mAP: [0-9.]*' "$work_dir/test.log" | tail -1 | cut -d' ' -f2)"
