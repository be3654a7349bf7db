"""What mmconvmlp adds to mmengine's runtime, each job in its own module:

* :mod:`.safe_loading`: torch's safe loading accepts mmengine's own checkpoints in every
  process that imports mmconvmlp, through checking stand-ins only, and a refused file says
  why;
* :mod:`.runner`: ``ConvMLPRunner``, named by ``runner_type`` in every config shipped here;
* :mod:`.atomic_save`: the runner's checkpoints appear whole or not at all;
* :mod:`.cpu_processes`: gloo processes and thread counts without CUDA;
* :mod:`.data_check`: a readable message when a config's data is missing;
* :mod:`.data_errors`: data that exist but cannot be used, named in one message;
* :mod:`.precision`: mixed precision chosen by what the machine runs fast;
* :mod:`.readable_errors`: those messages print without a traceback in the tools;
* :mod:`.download_timeout`: a checkpoint URL that never answers times out;
* :mod:`.command_line`: what tools/train.py and tools/test.py share;
* :mod:`.resume_state`, :mod:`.resumable_loader`: resumed runs end as uninterrupted ones;
* :mod:`.weights_fit`: testing refuses a checkpoint of another model.

Importing it registers the runner, the model wrapper and the optimizer wrappers, and sets up
the safe loading of :mod:`.safe_loading`; nothing else in the process changes.
"""
from .cpu_processes import CPUDistributedDataParallel
from .data_check import DataNotFoundError, check_data
from .download_timeout import CheckpointDownloadError, DownloadSettingError
from .precision import BF16AutocastOptimWrapper, mixed_precision_optim_wrapper
from .readable_errors import ReadableError, UsageError, install_excepthook
from .runner import ConvMLPRunner
from .safe_loading import (CheckpointRefusedError, CheckpointUnreadableError,
                           allow_mmengine_checkpoints)

allow_mmengine_checkpoints()

__all__ = ['BF16AutocastOptimWrapper', 'CheckpointDownloadError', 'CheckpointRefusedError',
           'CheckpointUnreadableError', 'ConvMLPRunner', 'CPUDistributedDataParallel',
           'DataNotFoundError', 'DownloadSettingError', 'ReadableError', 'UsageError',
           'check_data', 'install_excepthook', 'mixed_precision_optim_wrapper']
