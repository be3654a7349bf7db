"""Data-loader workers that live and die with the training process.

:class:`~.runner.ConvMLPRunner` starts every worker of its loaders (training, validation,
testing) through :class:`TiedToMainProcess`:

* A worker whose main process died (``kill -9``, the out-of-memory killer) is killed at
  once by the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux). PyTorch's own check
  ends an idle worker only, and a worker that had batches waiting in its queue then hangs
  at exit, holding its memory.
* SIGTERM and SIGUSR1 from any process but the main one are ignored: Slurm signals every
  process of a job step, workers included, and a worker killed by the signal would make
  the main process fail ("DataLoader worker exited unexpectedly") before it could save its
  checkpoint (:mod:`.preemption`). SIGTERM from the main process (its shutdown of the
  workers) ends the worker at once, as in PyTorch. The two signals are blocked in the
  worker and read by a thread that sees who sent them; processes the worker starts
  inherit them blocked.
"""
import ctypes
import os
import signal
import sys
import threading
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1
#: Signals that the main process handles and its workers ignore.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _answer_signals(main_pid: int) -> None:
    """In a thread of the worker: exit on the main process's SIGTERM, ignore the rest."""
    while True:
        info = signal.sigwaitinfo(PREEMPTION_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == main_pid:
            os._exit(0)


def tie_worker_to_main_process(main_pid: int) -> None:
    """Called first in a worker started by the process ``main_pid`` (see the module)."""
    if not sys.platform.startswith('linux'):
        return  # no PR_SET_PDEATHSIG, no sigwaitinfo: PyTorch's own handling only
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    threading.Thread(target=_answer_signals, args=(main_pid,), daemon=True,
                     name='preemption-signals').start()
    if os.getppid() != main_pid:
        return  # started by a fork server: PyTorch's check of its parent only
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 \
            and os.getppid() != main_pid:  # the main process died before prctl took effect
        os._exit(1)


class TiedToMainProcess:
    """A DataLoader ``worker_init_fn``: :func:`tie_worker_to_main_process`, then
    ``worker_init_fn``. Made in the main process."""

    def __init__(self, worker_init_fn: Optional[Callable[[int], None]]):
        self.worker_init_fn = worker_init_fn
        self.main_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        tie_worker_to_main_process(self.main_pid)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)
