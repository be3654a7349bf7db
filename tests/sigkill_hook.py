"""A hook the resume tests add to a run (``custom_imports``): it kills its own process with
SIGKILL, as ``kill -9`` does, right after a given training iteration."""
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SigkillAfterIteration(Hook):
    priority = 'LOWEST'  # after the checkpoint hook

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
