#!/usr/bin/env bash
# Shared by dist_train.sh and dist_test.sh: start NUM_PROCESSES copies of a tool with
# torchrun, one per GPU, or, without CUDA, gloo processes on the CPU.
# Usage: bash tools/dist_launch.sh TOOL.py NUM_PROCESSES [tool arguments]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every node.
set -euo pipefail
script=$1
nproc=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ "${NNODES:-1}" != 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "dist_launch: NNODES=$NNODES: set MASTER_ADDR to the first node's address on every node" >&2
  exit 2
fi
# $PYTHON if set, else the repository's .venv, else python on the PATH.
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x "$here/../.venv/bin/python" ]; then python=$here/../.venv/bin/python
else python=python; fi
exec "$python" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
  --nproc_per_node="$nproc" \
  "$here/$script" "$@" --launcher pytorch
