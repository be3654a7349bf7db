"""A training stopped by a cluster (preemption, a time limit) saves the iteration it was at.

Clusters end a job with a signal and a grace period before SIGKILL: Slurm sends SIGTERM
when it preempts a job, and the signal asked for with ``sbatch --signal`` (SIGUSR1 in
``tools/slurm_sbatch.sh``) before the time limit; Kubernetes sends SIGTERM, which torchrun
passes on to its workers. While :class:`~.runner.ConvMLPRunner` trains,
:class:`PreemptionHook` catches SIGTERM and SIGUSR1 (:meth:`PreemptionHook.catching_signals`
installs the handlers when training starts and puts the previous ones back when it ends:
importing mmconvmlp installs nothing). At the end of the training iteration during which a
signal came:

* every process learns whether any process got one (an all-reduce of the signal number
  each iteration), so that all stop after the same iteration;
* rank 0 saves ``iter_N.pth`` of that iteration the usual whole-or-nothing way
  (:mod:`.atomic_save`) and names it in ``last_checkpoint``; all processes wait for it.
  After the last iteration of an epoch, the epoch's end runs first (the schedulers' step,
  the checkpoint hook) and ``epoch_N.pth`` is saved instead, so that the resume starts the
  next epoch; a validation due after that epoch is left out, and the log line says so;
* one log line says why, rank 0 writes the checkpoint's path to ``WORK_DIR/.preempted``
  (:data:`PREEMPTED_MARKER`), and every process exits with :data:`PREEMPTED_EXIT_CODE`.

The marker is for job scripts that cannot rely on the exit status: ``srun
--kill-on-bad-exit`` ends the other tasks once the first exits with 75, and then reports
128 + the signal that ended them. Training removes the marker when it starts.

``--resume`` continues from that iteration (:mod:`.resume_state`). Another signal during
the save changes nothing. A signal during a validation inside training stops it after the
current batch when the checkpoint saved just before holds the training as it is (the
checkpoint and validation intervals agree, as in the shipped configs): that checkpoint is
the resume point, and nothing new is saved. Otherwise it is acted on after the next
training iteration. DataLoader workers ignore these signals (:mod:`.worker_lifetime`).
"""
import contextlib
import logging
import os
import os.path as osp
import signal
import threading
from typing import Optional

import torch
from mmengine.dist import all_reduce, barrier, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop

from .atomic_save import write_text
from .resume_state import ResumeStateHook
from .worker_lifetime import PREEMPTION_SIGNALS

#: The exit status of a training stopped by a preemption signal after saving its
#: checkpoint (EX_TEMPFAIL of sysexits.h: "try again later"); a failure exits with 1.
PREEMPTED_EXIT_CODE = 75

#: In the work dir: the path of the checkpoint that a preempted training saved last.
PREEMPTED_MARKER = '.preempted'


class TrainingPreempted(SystemExit):
    """Ends the process with :data:`PREEMPTED_EXIT_CODE`, without a traceback, once the
    checkpoint is saved."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


class PreemptionHook(Hook):
    """Saves a checkpoint and stops training after a preemption signal (see the module)."""

    priority = 'LOWEST'  # after the schedulers' step, the logger and the checkpoint hook

    def __init__(self):
        self._received = 0  # the first signal received while training, 0 before one
        self._at_epoch_end = 0  # a signal agreed on after an epoch's last iteration
        self._catching = False  # inside catching_signals, handlers installed
        self._checkpoint_at = (-1, None)  # (training iterations, path) of the last one saved
        self._stop_in_validation = False  # this validation may stop at a signal

    @contextlib.contextmanager
    def catching_signals(self):
        """Catch SIGTERM and SIGUSR1 for the duration of the block (in the main thread;
        signal handlers cannot be set in another)."""
        if threading.current_thread() is not threading.main_thread():
            print_log('Training runs outside the main thread, where no signal handler can '
                      'be set: SIGTERM and SIGUSR1 end it without a checkpoint.',
                      logger='current', level=logging.WARNING)
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in PREEMPTION_SIGNALS}
        self._catching = True
        try:
            yield
        finally:
            for sig, handler in previous.items():  # None: set outside Python, not restorable
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            self._received = self._at_epoch_end = 0
            self._catching = False

    def _on_signal(self, signum, frame) -> None:
        self._received = self._received or signum

    def _agreed_signal(self) -> int:
        """The signal any process received (the largest number), 0 when none did."""
        if get_world_size() == 1:
            return self._received
        flag = torch.tensor([self._received], dtype=torch.int64)
        all_reduce(flag, op='max')
        return int(flag.item())

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._note_checkpoint(runner, runner.iter + 1)
        signum = self._agreed_signal()
        if not signum:
            return
        iteration = runner.iter + 1
        if not isinstance(runner.train_loop, IterBasedTrainLoop):
            if self._ends_epoch(runner, batch_idx):
                self._at_epoch_end = signum  # acted on in after_train_epoch
                return
            at = f'epoch {runner.epoch + 1}, iteration {iteration}'
        else:
            at = f'iteration {iteration}' + self._validation_left_out(
                runner, iteration, runner.train_loop.max_iters, 'iteration')
        self._stop(runner, signum, f'iter_{iteration}.pth', False, at)

    def _ends_epoch(self, runner, batch_idx: int) -> bool:
        """Whether the iteration just trained is its epoch's last (a resumed epoch's batch
        numbers start at 0, so they alone cannot tell)."""
        hook = next((h for h in runner.hooks if isinstance(h, ResumeStateHook)), None)
        ended = None if hook is None else hook.ends_pass(runner, runner.iter + 1)
        return self.end_of_epoch(runner.train_dataloader, batch_idx) if ended is None else ended

    def after_train_epoch(self, runner) -> None:
        self._note_checkpoint(runner, runner.iter)
        signum, self._at_epoch_end = self._at_epoch_end, 0
        if not signum:
            return
        epoch = runner.epoch + 1
        at = f'end of epoch {epoch}, iteration {runner.iter}' + self._validation_left_out(
            runner, epoch, runner.train_loop.max_epochs, 'epoch')
        self._stop(runner, signum, f'epoch_{epoch}.pth', True, at)

    @staticmethod
    def _validation_left_out(runner, step: int, last: int, unit: str) -> str:
        """What the log line adds when the loop would validate after ``step`` (an epoch
        or an iteration): the resume starts after it, so that validation never runs."""
        loop = runner.train_loop
        if runner.val_loop is None or step < loop.val_begin or (
                step % loop.val_interval and step != last):
            return ''
        return f'; the validation after {unit} {step} is left out'

    def _note_checkpoint(self, runner, iterations: int) -> None:
        """Remember the checkpoint hook's save of this step, if it made one (it runs
        before this hook and names every save in ``last_ckpt``)."""
        path = runner.message_hub.get_info('last_ckpt')
        if path is not None and path != self._checkpoint_at[1]:
            self._checkpoint_at = (iterations, path)

    def before_val_epoch(self, runner) -> None:
        """A validation inside training may stop at a signal when the last checkpoint holds
        the training as it is (the checkpoint and validation intervals agree) and, with
        several processes, all have as many validation iterations (else they could not
        agree on the iteration to stop at)."""
        self._stop_in_validation = self._catching and self._checkpoint_at[0] == runner.iter
        if self._stop_in_validation and get_world_size() > 1:
            length = len(runner.val_loop.dataloader)
            lengths = torch.tensor([length, -length], dtype=torch.int64)
            all_reduce(lengths, op='max')
            self._stop_in_validation = int(lengths[0]) == -int(lengths[1])

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not self._stop_in_validation:
            return
        signum = self._agreed_signal()
        if not signum:
            return
        after = (f'iteration {runner.iter}' if isinstance(runner.train_loop, IterBasedTrainLoop)
                 else f'epoch {runner.epoch}')
        self._stop(runner, signum, None, False, f'during the validation after {after}, which '
                   'it holds; the rest of that validation is left out')

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._stop_in_validation = False

    def before_train(self, runner) -> None:
        # (a resumed message hub names the checkpoint before the one resumed from)
        self._checkpoint_at = (-1, runner.message_hub.get_info('last_ckpt'))
        marker = osp.join(runner.work_dir, PREEMPTED_MARKER)
        if is_main_process() and osp.exists(marker):
            os.remove(marker)

    def _stop(self, runner, signum: int, filename: Optional[str], by_epoch: bool,
              at: str) -> None:
        """Save ``filename`` (None: the last checkpoint holds this state), write the
        marker, log the line and end the process."""
        if filename is None:
            path = self._checkpoint_at[1]
        else:
            path = self._save(runner, filename, by_epoch)
        if is_main_process():
            write_text(osp.join(runner.work_dir, PREEMPTED_MARKER), path)
        barrier()
        print_log(f'{signal.Signals(signum).name} received: saved {path} ({at}) and stopping '
                  f'with exit code {PREEMPTED_EXIT_CODE}; train with --resume to continue '
                  'from it.', logger='current', level=logging.WARNING)
        raise TrainingPreempted()

    @staticmethod
    def _save(runner, filename: str, by_epoch: bool) -> str:
        """Save ``filename`` where the checkpoint hook saves (unless it just did) and name
        it in ``last_checkpoint``; returns its path."""
        hook = next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)
        out_dir = getattr(hook, 'out_dir', None) or runner.work_dir
        options = dict(file_client_args=getattr(hook, 'file_client_args', None),
                       backend_args=getattr(hook, 'backend_args', None))
        path = osp.join(out_dir, filename)
        if runner.message_hub.get_info('last_ckpt') != path:
            runner.save_checkpoint(out_dir, filename, by_epoch=by_epoch, **options)
            runner.message_hub.update_info('last_ckpt', path)
            if is_main_process():
                write_text(osp.join(runner.work_dir, 'last_checkpoint'), path)
        return path
