#!/usr/bin/env bash
# Train with several processes on this machine (GPUs, or gloo on the CPU without CUDA).
# Usage: bash tools/dist_train.sh CONFIG NUM_PROCESSES [tools/train.py options]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash $0 CONFIG NUM_PROCESSES [tools/train.py options]" >&2
  exit 2
fi
config=$1 nproc=$2
shift 2
exec bash "$(dirname "${BASH_SOURCE[0]}")/dist_launch.sh" train.py "$nproc" "$config" "$@"
