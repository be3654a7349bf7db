"""Several processes: ``--launcher pytorch|slurm|mpi``, and on CPUs without CUDA (gloo).

:func:`check_launcher_environment` stops a run whose launcher did not set the variables it
reads (on any device) with one line naming them. Without CUDA, mmengine 0.10.7 cannot
start the processes: its ``init_dist`` calls ``torch.cuda.set_device`` first, and it wraps
the model in DistributedDataParallel with ``device_ids=[LOCAL_RANK]``, which a CPU module
refuses. :func:`setup_cpu_distributed` starts the gloo process group itself and names
:class:`CPUDistributedDataParallel` as the model wrapper.
"""
import atexit
import os
import subprocess
import time
import warnings

import torch
import torch.distributed as torch_dist
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS

from .readable_errors import ReadableError

#: The variables each launcher sets in every process it starts, and how to start one.
LAUNCHER_VARIABLES = {
    'pytorch': (('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'),
                'torchrun sets them: bash tools/dist_train.sh CONFIG NUM_PROCESSES'),
    'slurm': (('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'),
              'srun sets them: bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR'),
    'mpi': (('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK',
             'MASTER_ADDR'),
            "Open MPI's mpirun sets the OMPI_ ones; across nodes, pass the first node's "
            "address too: mpirun -x MASTER_ADDR=HOST ..."),
}


class LauncherError(ReadableError, RuntimeError):
    """``--launcher`` names a launcher that did not start this process."""


def check_launcher_environment(launcher: str) -> None:
    """Raise :class:`LauncherError` naming the variables ``launcher`` should have set
    and did not (for ``'none'`` there are none). mmengine's MPI start needs ``MASTER_ADDR``,
    which mpirun does not set: where all processes run on one node, this sets it to
    127.0.0.1; across nodes the user must name the first node."""
    if launcher == 'mpi' and 'MASTER_ADDR' not in os.environ and _mpi_on_one_node():
        os.environ['MASTER_ADDR'] = '127.0.0.1'
    names, how = LAUNCHER_VARIABLES.get(launcher, ((), ''))
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise LauncherError(
            f'--launcher {launcher}: {", ".join(missing)} not set; {how}. For one process '
            'started by hand, leave out --launcher.')


def _mpi_on_one_node() -> bool:
    """Whether mpirun started every process on this node (as many here as in all)."""
    size = os.environ.get('OMPI_COMM_WORLD_SIZE')
    return size is not None and os.environ.get('OMPI_COMM_WORLD_LOCAL_SIZE') == size


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for CPU processes (gloo): no ``device_ids``, and SyncBN
    layers reverted to BatchNorm because torch's SyncBatchNorm runs on GPUs only (each
    process then normalizes with its own batch statistics)."""

    def __init__(self, module, **kwargs):
        kwargs.pop('device_ids', None)
        kwargs.pop('output_device', None)
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()):
            warnings.warn('SyncBN runs on GPUs only: on the CPU it is replaced by BatchNorm '
                          'with per-process statistics.')
            module = revert_sync_batchnorm(module)
        super().__init__(module=module, device_ids=None, **kwargs)


def _env_from_slurm() -> None:
    os.environ.setdefault('RANK', os.environ['SLURM_PROCID'])
    os.environ.setdefault('WORLD_SIZE', os.environ['SLURM_NTASKS'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0'))
    if 'MASTER_ADDR' not in os.environ:
        nodes = os.environ['SLURM_NODELIST']
        os.environ['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {nodes} | head -n1')
    os.environ.setdefault('MASTER_PORT', '29500')


def _env_from_mpi() -> None:
    os.environ.setdefault('RANK', os.environ['OMPI_COMM_WORLD_RANK'])
    os.environ.setdefault('WORLD_SIZE', os.environ['OMPI_COMM_WORLD_SIZE'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK', '0'))
    os.environ.setdefault('MASTER_PORT', '29500')


def setup_cpu_distributed(cfg, launcher: str) -> bool:
    """With a launcher but no CUDA, start the gloo process group here (mmengine's own
    start calls ``torch.cuda.set_device``) and make the Runner wrap the model in
    :class:`CPUDistributedDataParallel`. Returns whether it did; with CUDA, or with
    ``launcher='none'``, it changes nothing and mmengine proceeds as usual."""
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if launcher == 'slurm':
        _env_from_slurm()
    elif launcher == 'mpi':
        _env_from_mpi()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend='gloo', init_method='env://')
        atexit.register(_end_process_group)
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None or wrapper.get('type', 'MMDistributedDataParallel') \
            == 'MMDistributedDataParallel':
        wrapper = dict(wrapper or {})
        wrapper['type'] = 'CPUDistributedDataParallel'
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
        cfg.model_wrapper_cfg = wrapper
    return True


def _end_process_group() -> None:
    """At exit: a gloo thread frees a finished collective's tensors after the caller has
    moved on, and it needs the GIL for that. If the interpreter is already finalizing, the
    thread exits inside a destructor and the process aborts (SIGABRT, "terminate called
    without an active exception"): about 1 finished 2-process run in 30 did, after its
    last checkpoint's gather. A pause here, before finalization, lets it take the GIL."""
    time.sleep(0.1)
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def set_cpu_threads() -> None:
    """Without CUDA, use ``OMP_NUM_THREADS`` threads when it is set (torchrun sets 1 for
    each of several processes): a one-process run given the same value computes the same
    numbers as each process of a multi-process run."""
    if not torch.cuda.is_available() and os.environ.get('OMP_NUM_THREADS', '').isdigit():
        torch.set_num_threads(max(1, int(os.environ['OMP_NUM_THREADS'])))
