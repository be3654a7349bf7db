"""A run on a GPU needs mmcv's ops compiled with CUDA kernels.

mmcv 2.1.0 built without CUDA (``bash tools/setup_env.sh`` on a machine without a GPU) runs
its ops on the CPU only; on a GPU the model builds, the data load, and the run fails at the
first op, e.g. mmdet's first NMS: ``nms_impl: implementation for device cuda:0 not found``.
:func:`check_mmcv_cuda_ops` stops such a run before it starts, naming the command that
rebuilds mmcv.
"""
import torch

from .readable_errors import ReadableError

REBUILD_COMMAND = 'bash tools/setup_env.sh --cuda'


class MissingCudaOpsError(ReadableError, RuntimeError):
    """This run uses a GPU, and the installed mmcv has no CUDA kernels."""


def mmcv_cuda_version() -> str:
    """The CUDA version mmcv's ops were compiled with, e.g. ``'13.0'``; ``''`` for a build
    with CPU kernels only."""
    from mmcv.ops import get_compiling_cuda_version
    version = get_compiling_cuda_version()
    return '' if version == 'not available' else version


def check_mmcv_cuda_ops() -> None:
    """Raise :class:`MissingCudaOpsError` where a GPU is visible (so mmengine runs the model
    on it) and mmcv's ops were compiled without CUDA."""
    if not torch.cuda.is_available() or mmcv_cuda_version():
        return
    import mmcv
    raise MissingCudaOpsError(
        f'mmcv {mmcv.__version__} was built without CUDA ops, so it cannot run on the GPU '
        f'({torch.cuda.get_device_name()}) this run would use: rebuild it with '
        f'`{REBUILD_COMMAND}` (or run on the CPU with CUDA_VISIBLE_DEVICES=).')
