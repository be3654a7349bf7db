#!/usr/bin/env bash
# A Slurm batch job that trains, survives preemption and time limits, and resumes itself.
# Submit it from the repository's root folder:
#   sbatch -p PARTITION --nodes=1 --ntasks-per-node=8 --gres=gpu:8 --cpus-per-task=5 \
#     --time=24:00:00 tools/slurm_sbatch.sh CONFIG WORK_DIR [tools/train.py options]
# - Slurm sends SIGUSR1 to every training process 5 minutes before the time limit
#   (--signal below; without "B:" it reaches the tasks of srun, not this shell) and SIGTERM
#   when it preempts the job. Training then saves the iteration it is at and exits with
#   status 75 (mmconvmlp/engine/preemption.py), writing WORK_DIR/.preempted; then this
#   script requeues the job (a preempting Slurm with PreemptMode=REQUEUE requeues it
#   itself).
# - A job that starts again (requeued: SLURM_RESTART_COUNT > 0, or submitted anew) resumes
#   from WORK_DIR/last_checkpoint when that file exists.
# - PYTHON: the interpreter (default: .venv/bin/python of the repository, else python).
#SBATCH --job-name=mmconvmlp
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [sbatch options] $0 CONFIG WORK_DIR [tools/train.py options]" >&2
  exit 2
fi
config=$1 work_dir=$2
shift 2
# Slurm runs a copy of this script from its spool folder: find the repository by the
# folder the job was submitted from.
root=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ ! -f "$root/tools/train.py" ]; then
  echo "slurm_sbatch: $root/tools/train.py not found:" \
    "submit the job from the repository's root folder" >&2
  exit 2
fi
cd "$root"
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python; fi

resume=()
if [ -f "$work_dir/last_checkpoint" ]; then
  resume=(--resume)
  echo "slurm_sbatch: requeued ${SLURM_RESTART_COUNT:-0} times so far;" \
    "resuming from $(cat "$work_dir/last_checkpoint")"
fi
# Training writes WORK_DIR/.preempted once a signal's checkpoint is saved (and removes it
# when it starts); a stale one must not count for this run.
marker=$work_dir/.preempted
rm -f "$marker"
srun --kill-on-bad-exit=1 "$python" -u tools/train.py "$config" --work-dir "$work_dir" \
  ${resume[@]+"${resume[@]}"} "$@" --launcher slurm &
step=$!
# SIGTERM reaches this shell too when Slurm preempts the job: wait for the training to save.
# SIGUSR1 reaches it only with --signal=B:USR1@...: srun passes it on to the tasks.
trap 'echo "slurm_sbatch: SIGTERM: waiting for the training to save its checkpoint"' TERM
trap 'kill -USR1 "$step"' USR1
while kill -0 "$step" 2>/dev/null; do
  wait "$step"  # returns early when a trap runs
done
# The training's own exit status (bash keeps it), not that of a wait a trap cut short.
wait "$step"
status=$?
# --kill-on-bad-exit ends the other tasks once the first exits with 75, and srun then
# reports 128 + the signal that ended them: the marker tells that the save was done.
if [ "$status" -ne 0 ] && [ "$status" -ne 75 ] && [ -f "$marker" ]; then
  echo "slurm_sbatch: srun exited with $status after the training saved $(cat "$marker")" \
    "for a signal (srun ended the other tasks as the first exited with 75); treating it as 75"
  status=75
fi

if [ "$status" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "slurm_sbatch: training stopped for a signal and saved; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" \
    || echo "slurm_sbatch: scontrol requeue failed (Slurm may requeue it itself)" >&2
fi
exit "$status"
