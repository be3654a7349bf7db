#!/usr/bin/env bash
# Shared by slurm_train.sh and slurm_test.sh: run a tool as one Slurm task per GPU.
# Usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#        bash tools/slurm_launch.sh PARTITION JOB_NAME TOOL.py [tool arguments]
set -euo pipefail
partition=$1 job_name=$2 script=$3
shift 3
gpus=${GPUS:-8}
gpus_per_node=${GPUS_PER_NODE:-$((gpus < 8 ? gpus : 8))}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# $PYTHON if set, else the repository's .venv, else python on the PATH (as dist_launch.sh).
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x "$here/../.venv/bin/python" ]; then python=$here/../.venv/bin/python
else python=python; fi
# shellcheck disable=SC2086
exec srun -p "$partition" --job-name="$job_name" \
  --gres=gpu:"$gpus_per_node" --ntasks="$gpus" --ntasks-per-node="$gpus_per_node" \
  --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  "$python" -u "$here/$script" "$@" --launcher slurm
