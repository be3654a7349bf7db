"""A toy training that tools/train.py runs in a second (the tests put tests/ on PYTHONPATH
and name this module in ``custom_imports``): a model with dropout, a data set whose samples
draw from Python's, numpy's and torch's generators, and hooks that signal or kill the
process after a given iteration. Every random draw shows in the final weights, so a resume
that restores less than everything ends with other weights.

:func:`write_config` writes its config file."""
import atexit
import os
import random
import signal
import subprocess
import time

import numpy as np
import psutil
import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.dataset import BaseDataset
from mmengine.evaluator import BaseMetric
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS


@MODELS.register_module()
class NoisyToyModel(BaseModel):
    """Two linear layers with dropout between them: inputs (B, 4) -> a squared error."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(4, 8)
        self.dropout = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, inputs, targets=None, mode='tensor'):
        prediction = self.out(self.dropout(torch.relu(self.hidden(inputs))))
        if mode == 'loss':
            return dict(loss=(prediction.squeeze(1) - targets).pow(2).mean())
        return prediction


@DATASETS.register_module()
class NoisyToyDataset(BaseDataset):
    """``length`` samples; each ``inputs`` (4,) gets noise from all three generators."""

    def __init__(self, length=12):
        self.length = length
        super().__init__(serialize_data=False)

    def load_data_list(self):
        return [dict(img_path=f'sample_{i}') for i in range(self.length)]

    def __getitem__(self, index):
        base = torch.full((4,), float(index))
        noise = torch.tensor([random.random(), np.random.rand(), 0.0, 0.0]) \
            + torch.rand(4) * torch.tensor([0., 0., 1., 1.])
        return dict(inputs=base + noise, targets=torch.tensor(float(index % 3)))


@HOOKS.register_module()
class SignalAfterIteration(Hook):
    """Sends ``signal_name`` after training iteration ``iteration`` (counted from 1) to the
    processes of ``ranks`` and to their data-loader workers, as Slurm signals every process
    of a job; ``again_while_saving`` sends it once more while the checkpoint is written;
    ``parent`` sends it to the parent process too (a Slurm batch shell that preemption
    signals as well). ``SIGKILL`` kills the process at once, as ``kill -9`` does."""

    priority = 'NORMAL'  # before the preemption hook of the same iteration

    def __init__(self, iteration, signal_name='SIGTERM', ranks=(0,), again_while_saving=False,
                 parent=False):
        self.iteration = iteration
        self.signal = getattr(signal, signal_name)
        self.ranks = ranks
        self.again_while_saving = again_while_saving
        self.parent = parent
        self.sent = False

    def _send(self):
        children = [str(child.pid) for child in psutil.Process().children(recursive=True)]
        if children and self.signal != signal.SIGKILL:  # (those die with the process)
            # from another process, as Slurm's: a worker takes the main process's SIGTERM
            # as the order to exit
            subprocess.run(['kill', f'-{self.signal.name[3:]}', *children], check=True)
        if self.parent:
            os.kill(os.getppid(), self.signal)
        os.kill(os.getpid(), self.signal)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration and runner.rank in self.ranks:
            self.sent = True
            self._send()

    def before_save_checkpoint(self, runner, checkpoint):
        if self.sent and self.again_while_saving:
            self._send()


@HOOKS.register_module()
class SignalDuringValidation(SignalAfterIteration):
    """Sends the signal after batch ``batch`` (counted from 1) of the validation that
    follows training iteration ``iteration``."""

    def __init__(self, iteration, batch, **kwargs):
        super().__init__(iteration, **kwargs)
        self.batch = batch

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        pass

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if (runner.iter, batch_idx + 1) == (self.iteration, self.batch) \
                and runner.rank in self.ranks:
            self._send()


@METRICS.register_module()
class ToyError(BaseMetric):
    """The mean squared error of the toy model's predictions."""

    def process(self, data_batch, data_samples):
        errors = (torch.cat(list(data_samples)) - data_batch['targets']).pow(2)
        self.results.extend(errors.tolist())

    def compute_metrics(self, results):
        return dict(error=sum(results) / len(results))


@HOOKS.register_module()
class SlowExit(Hook):
    """The processes of ``ranks`` take ``seconds`` more to end once training is over (an
    exit handler sleeps), as a process tearing down CUDA and NCCL may."""

    def __init__(self, seconds, ranks=(0,)):
        self.seconds = seconds
        self.ranks = ranks

    def before_train(self, runner):
        if runner.rank in self.ranks:
            atexit.register(time.sleep, self.seconds)


def write_config(path, by_epoch=True, num_workers=1, length=12, batch_size=2,
                 extra='', val_interval=0):
    """A config of the toy training: 3 epochs (or 18 iterations of an infinite sampler),
    batch ``batch_size``, seed 0, a checkpoint every epoch (or every 6 iterations); with
    ``val_interval``, a validation of 4 batches of 2 every so many epochs (iterations)."""
    loop = ("train_cfg = dict(by_epoch=True, max_epochs=3)\n"
            "checkpoint = dict(type='CheckpointHook', interval=1)\n"
            "sampler = dict(type='DefaultSampler', shuffle=True)\n") if by_epoch else (
        "train_cfg = dict(by_epoch=False, max_iters=18)\n"
        "checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=6)\n"
        "sampler = dict(type='InfiniteSampler', shuffle=True)\n"
        "log_processor = dict(by_epoch=False)\n")
    if val_interval:
        loop += (
            f"train_cfg.update(val_interval={val_interval})\n"
            "val_dataloader = dict(batch_size=2, num_workers=0, sampler=dict("
            "type='DefaultSampler', shuffle=False), collate_fn=dict(type='default_collate'), "
            "dataset=dict(type='NoisyToyDataset', length=8))\n"
            "val_cfg = dict()\n"
            "val_evaluator = dict(type='ToyError')\n")
    path.write_text(
        "custom_imports = dict(imports=['mmconvmlp', 'toy_training'], "
        "allow_failed_imports=False)\n"
        "default_scope = 'mmengine'\n"
        "runner_type = 'ConvMLPRunner'\n"
        "model = dict(type='NoisyToyModel')\n"
        f"{loop}"
        f"train_dataloader = dict(batch_size={batch_size}, num_workers={num_workers}, "
        f"persistent_workers={num_workers > 0}, sampler=sampler, "
        "collate_fn=dict(type='default_collate'), "
        f"dataset=dict(type='NoisyToyDataset', length={length}))\n"
        "optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9))\n"
        "default_hooks = dict(checkpoint=checkpoint, logger=dict(type='LoggerHook', "
        "interval=1))\n"
        "randomness = dict(seed=0)\n"
        "log_level = 'INFO'\n" + extra)
    return path
