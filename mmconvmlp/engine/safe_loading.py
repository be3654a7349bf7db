"""torch's safe loading for mmengine 0.10.7's checkpoints, in every process that imports
mmconvmlp.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses the
mmengine objects inside mmengine's own checkpoints (the message hub's ``HistoryBuffer``\\ s
and numpy values), so resuming, ``load_from``, testing, the Inferencers and ``init_cfg``
Pretrained all fail on them. Importing mmconvmlp (which a config's ``custom_imports`` does)
calls :func:`allow_mmengine_checkpoints`, which adds exactly those types to what safe
loading allows, for the whole process; safe loading stays on. It also makes mmengine's
checkpoint loaders (``CheckpointLoader``: local files, URLs, ``open-mmlab://`` ...) answer
a file that safe loading refuses with :class:`CheckpointRefusedError`, a message that says
the file would run code and names what it asks for, and an empty, truncated or
non-checkpoint file with :class:`CheckpointUnreadableError`, a message that names the file
and what is wrong with it.
"""
import functools
import os.path as osp
import pickle
import re
import struct
import zipfile
from typing import Callable, Optional

import torch
from mmengine.runner.checkpoint import CheckpointLoader

from .readable_errors import ReadableError


class CheckpointRefusedError(ReadableError, pickle.UnpicklingError):
    """A checkpoint whose loading would import or call something other than the types
    checkpoints hold (tensors, containers, numbers, mmengine's logging buffers)."""


class CheckpointUnreadableError(ReadableError, RuntimeError):
    """A file given as a checkpoint that is empty, truncated, damaged or no checkpoint."""


#: Parts of torch's safe-loading messages that mean the file asks for something to be
#: imported or called (rather than being no pickle at all).
_RUNS_CODE = re.compile(r'GLOBAL|call reduce|Can only build')


def _history_buffer_method(owner, name: str):
    """Stands in for ``builtins.getattr`` while unpickling under safe loading.

    A HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``
    and so on; allowing the real ``getattr`` would let a file reach any attribute of any
    allowed object (and from there run code), so only public methods of HistoryBuffer can
    be looked up through this one."""
    from mmengine.logging.history_buffer import HistoryBuffer
    method = vars(HistoryBuffer).get(name) if owner is HistoryBuffer else None
    if name.startswith('_') or not callable(method):
        owner_name = getattr(owner, '__qualname__', type(owner).__qualname__)
        raise pickle.UnpicklingError(
            f'Unsupported global: GLOBAL builtins.getattr({owner_name},{name!r}) was not '
            'allowed: only the statistics methods of mmengine\'s HistoryBuffer can be looked '
            'up.')
    return method


def mmengine_checkpoint_globals() -> list:
    """What mmengine 0.10.7 stores in its checkpoints besides tensors and containers
    (``torch.serialization.get_unsafe_globals_in_checkpoint`` on the checkpoints of a
    detection and a segmentation run): the message hub's HistoryBuffers, their statistics
    methods (via getattr) and numpy arrays, dtypes and scalars."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    allowed = [HistoryBuffer, np.ndarray, np.dtype,
               (_history_buffer_method, 'builtins.getattr')]
    # numpy 2 writes numpy._core.multiarray, numpy 1 wrote numpy.core.multiarray.
    allowed += [(function, f'{module}.multiarray.{function.__name__}')
                for function in (_reconstruct, scalar)
                for module in ('numpy._core', 'numpy.core')]
    # Unpickled dtypes are instances of numpy's dtype classes (Float64DType, ...), whose
    # state is restored by the BUILD step only for allowed classes.
    allowed += [cls for cls in vars(getattr(np, 'dtypes', object)).values()
                if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return allowed


def torch_complaint(error: Exception) -> str:
    """The line of a safe-loading error that says what the unpickler met; torch's message
    wraps it in a header and a pointer to its documentation."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 2 else lines[-1]


def refusal_message(filename: str, error: Exception) -> str:
    """Why safe loading refused ``filename``, from torch's or our getattr's message."""
    found = re.search(r'GLOBAL (\S+)', str(error))
    asked = f'it asks to import and call {found.group(1).rstrip(".,")}' if found else \
        f'torch says: {torch_complaint(error)}'
    return (f'{filename} was refused: loading it would run code ({asked}), and '
            'checkpoints are loaded with torch\'s safe loading, which allows only tensors, '
            'containers, numbers and mmengine\'s own logging types. Load only files from a '
            'source you trust. One of the authors\' released MMDetection 2.x / '
            'MMSegmentation 0.x checkpoints can be converted once, without running '
            'anything in it: python tools/model_converters/convert_released_checkpoint.py '
            f'{filename} CONVERTED.pth')


def unreadable_reason(filename: str, error: Exception) -> Optional[str]:
    """What is wrong with the local file ``filename`` that ``torch.load`` failed on with
    ``error``, or None when the file itself looks sound (the error is about something
    else). torch.save writes a zip archive; older files are a plain pickle stream."""
    if not osp.isfile(filename):
        return None
    size = osp.getsize(filename)
    if size == 0:
        return 'the file is empty (0 bytes)'
    with open(filename, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):
        if not zipfile.is_zipfile(filename):
            return (f'the file is truncated ({size} bytes): the end of the zip archive '
                    'torch.save writes is missing')
        with zipfile.ZipFile(filename) as archive:
            broken = archive.testzip()
        return f'the file is damaged: {broken} in its zip archive fails its check' \
            if broken else None
    if head.startswith(b'\x80'):  # a pickle stream: torch's legacy format
        if isinstance(error, (EOFError, struct.error)) or 'truncated' in str(error):
            return f'the file is truncated ({size} bytes)'
        return None
    return f'the file is not a PyTorch checkpoint (it starts with {head!r})'


def _with_readable_errors(loader: Callable) -> Callable:
    """``loader`` (one of CheckpointLoader's schemes), raising
    :class:`CheckpointRefusedError` where safe loading refuses the file and
    :class:`CheckpointUnreadableError` where the file is no sound checkpoint."""
    @functools.wraps(loader)  # keeps __name__: mmengine logs it ("by local backend")
    def load(filename, *args, **kwargs):
        try:
            return loader(filename, *args, **kwargs)
        except ReadableError:
            raise
        except pickle.UnpicklingError as error:
            if _RUNS_CODE.search(str(error)):
                raise CheckpointRefusedError(refusal_message(filename, error)) from None
            reason = unreadable_reason(filename, error) or \
                f'torch says: {torch_complaint(error)}'
            raise CheckpointUnreadableError(_unreadable(filename, reason)) from None
        except Exception as error:
            reason = unreadable_reason(filename, error)
            if reason is None:
                raise
            raise CheckpointUnreadableError(_unreadable(filename, reason)) from None
    load.gives_readable_errors = True
    return load


def _unreadable(filename: str, reason: str) -> str:
    return (f'{filename} cannot be loaded as a checkpoint: {reason}. Give a file written by '
            'torch.save or by a training run (epoch_N.pth, iter_N.pth); a copy cut short '
            '(a full disk, a killed job, an interrupted download) must be written again.')


def allow_mmengine_checkpoints() -> None:
    """Allow :func:`mmengine_checkpoint_globals` to torch's safe loading process-wide, and
    wrap every loader registered with mmengine's CheckpointLoader so that a refused or
    unreadable file says why. Safe loading stays on. Called when mmconvmlp is imported."""
    if hasattr(torch.serialization, 'add_safe_globals'):  # torch >= 2.4
        torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not getattr(loader, 'gives_readable_errors', False):
            CheckpointLoader.register_scheme(prefix, _with_readable_errors(loader), force=True)

