"""What mmconvmlp adds to mmengine's runtime, each job in its own module:

* :mod:`.safe_loading`: torch's safe loading accepts mmengine's own checkpoints in every
  process that imports mmconvmlp, and a refused file says it would run code;
* :mod:`.runner`: ``ConvMLPRunner``, named by ``runner_type`` in every config shipped here;
* :mod:`.atomic_save`: the runner's checkpoints appear whole or not at all;
* :mod:`.cpu_processes`: gloo processes and thread counts without CUDA;
* :mod:`.data_check`: a readable message when a config's data is missing;
* :mod:`.data_errors`: data that exist but cannot be used, named in one message;
* :mod:`.precision`: mixed precision chosen by what the machine runs fast;
* :mod:`.readable_errors`: those messages print without a traceback in scripts;
* :mod:`.download_timeout`: a checkpoint URL that never answers times out;
* :mod:`.resume_state`, :mod:`.resumable_loader`: resumed runs end as uninterrupted ones;
* :mod:`.weights_fit`: testing refuses a checkpoint of another model.

Importing it registers the runner, the model wrapper and the optimizer wrappers.
"""
from .cpu_processes import CPUDistributedDataParallel
from .data_check import DataNotFoundError, check_data
from .download_timeout import CheckpointDownloadError, add_download_timeout
from .precision import BF16AutocastOptimWrapper, mixed_precision_optim_wrapper
from .readable_errors import ReadableError, install_excepthook
from .runner import ConvMLPRunner
from .safe_loading import (CheckpointRefusedError, CheckpointUnreadableError,
                           allow_mmengine_checkpoints)

add_download_timeout()
allow_mmengine_checkpoints()
install_excepthook()

__all__ = ['BF16AutocastOptimWrapper', 'CheckpointDownloadError', 'CheckpointRefusedError',
           'CheckpointUnreadableError', 'ConvMLPRunner', 'CPUDistributedDataParallel',
           'DataNotFoundError', 'ReadableError', 'check_data', 'mixed_precision_optim_wrapper']
