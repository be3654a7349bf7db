#!/usr/bin/env bash
# Test with several processes on this machine (GPUs, or gloo on the CPU without CUDA).
# Usage: bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [tools/test.py options]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash $0 CONFIG CHECKPOINT NUM_PROCESSES [tools/test.py options]" >&2
  exit 2
fi
config=$1 checkpoint=$2 nproc=$3
shift 3
exec bash "$(dirname "${BASH_SOURCE[0]}")/dist_launch.sh" test.py "$nproc" \
  "$config" "$checkpoint" "$@"
