#!/usr/bin/env bash
# Train on a Slurm cluster, one task per GPU (srun, in the foreground). For a batch job that
# saves before its time limit or a preemption and requeues and resumes itself, submit
# tools/slurm_sbatch.sh instead.
# Usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#        bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash $0 PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]" >&2
  exit 2
fi
partition=$1 job_name=$2 config=$3 work_dir=$4
shift 4
exec bash "$(dirname "${BASH_SOURCE[0]}")/slurm_launch.sh" "$partition" "$job_name" \
  train.py "$config" --work-dir "$work_dir" "$@"
