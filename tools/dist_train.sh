#!/usr/bin/env bash
# Train with several processes on this machine (GPUs, or gloo on the CPU without CUDA).
# Usage: bash tools/dist_train.sh CONFIG NUM_PROCESSES [tools/train.py options]
# Exits with 75 when SIGTERM or SIGUSR1 stopped the training after a checkpoint of the
# current iteration (--resume continues from it), as tools/train.py does.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash $0 CONFIG NUM_PROCESSES [tools/train.py options]" >&2
  exit 2
fi
config=$1 nproc=$2
shift 2
exec bash "$(dirname "${BASH_SOURCE[0]}")/dist_launch.sh" train.py "$nproc" "$config" "$@"
