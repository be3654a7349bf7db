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
# torchrun passes SIGTERM (and, with this list, SIGUSR1) on to its processes, which save a
# checkpoint and exit with 75 (mmconvmlp/engine/preemption.py); this launcher then exits
# with 75 too, where torchrun alone would report a failure (1).
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
exec "$python" - \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
  --nproc_per_node="$nproc" \
  "$here/$script" "$@" --launcher pytorch <<'PY'
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

PREEMPTED = 75  # mmconvmlp.engine.preemption.PREEMPTED_EXIT_CODE
try:
    run(parse_args(sys.argv[1:]))
except ChildFailedError as error:
    # A process exits with 75 only after all of them agreed to stop and the checkpoint was
    # saved; torchrun then ends those still shutting down (SIGTERM, SIGKILL 30 s later).
    codes = {failure.exitcode for failure in error.failures.values()}
    if PREEMPTED not in codes or codes - {PREEMPTED, -signal.SIGTERM, -signal.SIGKILL}:
        raise
    sys.exit(PREEMPTED)
except SignalException as error:  # torchrun passed the signal on and its processes ended
    sys.exit(PREEMPTED if error.sigval in (signal.SIGTERM, signal.SIGUSR1) else 1)
PY
