"""One training at a time in a work dir.

Two trainings in one work dir mix their logs and checkpoints (``epoch_1.pth`` of one run
next to ``epoch_2.pth`` of the other). While it trains, rank 0 of a run holds an exclusive
lock on ``WORK_DIR/.training.lock`` (``flock``); a second training there stops with
:class:`WorkDirBusyError`, naming the process that holds it. The operating system drops
the lock when its process ends, however it ends (``kill -9`` included), so a lock file
left by a killed run blocks nothing. Once it holds the lock, a run removes the hidden
partial checkpoints (:mod:`.atomic_save`) that a killed run left in the work dir: no live
run is writing them.
"""
import contextlib
import fcntl
import os
import os.path as osp
import socket
import time

from .atomic_save import is_partial_name
from .readable_errors import ReadableError

LOCK_NAME = '.training.lock'


class WorkDirBusyError(ReadableError, RuntimeError):
    """Another live training holds the work dir."""


@contextlib.contextmanager
def hold_work_dir(work_dir: str, main_process: bool = True):
    """Hold ``work_dir`` for the block (rank 0 only: ``main_process``)."""
    if not main_process:
        yield
        return
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'unknown'
        os.close(fd)
        raise WorkDirBusyError(
            f'The work dir {work_dir} is in use by another training ({holder}): two runs '
            'in one work dir would mix their logs and checkpoints. Wait until it ends, or '
            'give this run another --work-dir.') from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'process {os.getpid()} on {socket.gethostname()}, started '
                      f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode(), 0)
        for name in os.listdir(work_dir):
            if is_partial_name(name):
                os.remove(osp.join(work_dir, name))
        yield
    finally:
        os.close(fd)  # releases the lock
