"""torch's safe loading for mmengine 0.10.7's checkpoints, without trusting numpy or mmengine.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses what
mmengine writes besides tensors: the message hub's ``HistoryBuffer`` s (with their
statistics methods, pickled as ``getattr(HistoryBuffer, 'mean')``) and numpy arrays,
dtypes and scalars. Resuming, ``load_from``, testing, the Inferencers and ``init_cfg``
Pretrained all fail on them.

Allowing numpy's and mmengine's own classes would let a file steer the process: numpy's
``ndarray(shape, dtype, buffer)``, ``_reconstruct`` + ``__setstate__`` and
``dtype.__setstate__`` take object dtypes, field offsets and flags from the file (pointers
read from the file, memory outside the item), and ``HistoryBuffer.__setstate__`` updates a
dict its whole class shares. So :func:`allow_mmengine_checkpoints` adds to torch's
allow-list only *checking stand-ins*, under the names those pickles use:

* ``numpy.dtype`` -> :class:`PickledDtype`: bool, integer, float and complex dtypes, in
  either byte order, nothing else (no objects, strings, fields, sub-arrays or flags);
* ``numpy.ndarray`` and ``numpy._core.multiarray._reconstruct`` (numpy 1:
  ``numpy.core...``) -> :class:`LoadedArray`, :func:`reconstruct`: an array of such a dtype
  whose bytes match its shape, copied;
* ``numpy._core.multiarray.scalar`` -> :func:`scalar`: a numpy number of such a dtype;
  ``builtins.bytes`` -> :func:`empty_bytes`: the empty bytes of an empty array;
* ``mmengine.logging.history_buffer.HistoryBuffer`` -> :class:`LoadedHistoryBuffer`, which
  becomes a ``HistoryBuffer`` built by its own constructor from the logged numbers, and
  ``builtins.getattr`` -> :func:`history_buffer_method`, which looks up only HistoryBuffer's
  public methods.

Each refuses anything else with ``pickle.UnpicklingError``, which torch reports as its own
safe-loading error, so even a process-wide entry cannot widen what a file can do.

mmengine's checkpoint loading (``CheckpointLoader.load_checkpoint``, which every scheme,
``load_checkpoint``, the Runner, the Inferencers and ``init_cfg`` go through) answers a
refused file with :class:`CheckpointRefusedError` and an empty, truncated or
non-checkpoint file with :class:`CheckpointUnreadableError`, and gives an ``http(s)://``
download a timeout of its own (:mod:`.download_timeout`). Both are installed once by
:func:`allow_mmengine_checkpoints`, which importing mmconvmlp calls.
"""
import math
import os.path as osp
import pickle
import re
import struct
import zipfile
from typing import Any, Optional

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from .download_timeout import cache_url, model_zoo_url
from .readable_errors import ReadableError


class CheckpointRefusedError(ReadableError, pickle.UnpicklingError):
    """A checkpoint whose loading would import or call something other than the types
    checkpoints hold, or that holds values the checking stand-ins refuse."""


class CheckpointUnreadableError(ReadableError, RuntimeError):
    """A file given as a checkpoint that is empty, truncated, damaged or no checkpoint."""


#: Starts every refusal of the stand-ins below (found again in torch's message).
REFUSED = 'refused by mmconvmlp\'s safe loading:'
#: numpy dtype kinds that hold numbers: bool, signed and unsigned integers, float, complex.
NUMERIC_KINDS = 'biufc'
#: The most dimensions numpy arrays have; the most items a pickled array may claim.
MAX_DIMS, MAX_ITEMS = 64, 2 ** 48


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f'{REFUSED} {what}')


# --------------------------------------------------------------------------------------------
# Numbers: the checks the stand-ins and the converter (mmconvmlp.checkpoints) share
# --------------------------------------------------------------------------------------------
def numeric_dtype(code: Any, byte_order: Any = '|') -> np.dtype:
    """The numpy dtype of ``code`` ('f8', 'i4', 'b1', ...) in ``byte_order`` ('<', '>', '|'
    or '='); refused unless it is a bool, integer, float or complex dtype."""
    if type(code) is not str or not re.fullmatch(r'[<>|=]?[a-zA-Z?]\d*', code):
        raise _refuse(f'numpy dtype {code!r}: only numeric dtype codes (f8, i4, ...) load')
    try:
        dtype = np.dtype(code)
    except TypeError:
        raise _refuse(f'numpy dtype {code!r} is no dtype') from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        raise _refuse(f'numpy dtype {code!r} ({dtype}) holds no plain numbers; only '
                      'bool, integer, float and complex values load')
    if type(byte_order) is not str or byte_order not in ('<', '>', '|', '='):
        raise _refuse(f'numpy byte order {byte_order!r}')
    return dtype.newbyteorder(byte_order) if byte_order in '<>' else dtype


def check_array(shape: Any, dtype: np.dtype, fortran: Any, raw: Any) -> None:
    """Refuse a pickled array unless ``shape`` is a tuple of sizes, ``fortran`` a bool and
    ``raw`` bytes exactly as long as the items of the numeric ``dtype``."""
    if not (type(shape) is tuple and len(shape) <= MAX_DIMS
            and all(type(n) is int and n >= 0 for n in shape)
            and math.prod(n for n in shape if n) <= MAX_ITEMS):
        raise _refuse(f'numpy array shape {shape!r}')
    if type(raw) is not bytes or type(fortran) is not bool:
        raise _refuse('numpy array data that are no bytes')
    if len(raw) != dtype.itemsize * math.prod(shape):
        raise _refuse(f'numpy array of shape {shape} and dtype {dtype} with {len(raw)} bytes '
                      f'instead of {dtype.itemsize * math.prod(shape)}')


def numeric_array(shape: Any, dtype: np.dtype, fortran: Any, raw: Any) -> np.ndarray:
    """A new array of ``shape`` and the numeric ``dtype`` copied from the bytes ``raw``
    (checked by :func:`check_array`)."""
    check_array(shape, dtype, fortran, raw)
    order = 'F' if fortran else 'C'
    return np.frombuffer(raw, dtype).reshape(shape, order=order).copy(order=order)


def numeric_scalar(dtype: np.dtype, raw: Any) -> np.generic:
    """The numpy number of the numeric ``dtype`` held by the bytes ``raw``."""
    if type(raw) is not bytes or len(raw) != dtype.itemsize:
        size = f'{len(raw)} bytes' if type(raw) is bytes else f'a {type(raw).__name__}'
        raise _refuse(f'numpy {dtype} number from {size}')
    return np.frombuffer(raw, dtype)[0].copy()


# --------------------------------------------------------------------------------------------
# The stand-ins
# --------------------------------------------------------------------------------------------
class PickledDtype:
    """Stands in for ``numpy.dtype``: a pickle's ``dtype(code, align, copy)`` and the state
    restored into it, checked by :func:`numeric_dtype`. ``.dtype`` is the numpy dtype; it
    pickles again as that dtype."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        self.dtype = numeric_dtype(code)

    def __setstate__(self, state: Any) -> None:
        """numpy's dtype state: (version, byte order, sub-array, names, fields, item size,
        alignment, flags[, metadata]), with no sub-array, fields, sizes or flags for
        numbers."""
        if not (type(state) is tuple and len(state) in (8, 9)
                and type(state[0]) is int and state[0] in (3, 4)
                and all(part is None for part in state[2:5] + state[8:])
                and all(type(part) is int for part in state[5:8])
                and state[5:8] == (-1, -1, 0)):
            raise _refuse(f'numpy dtype state {state!r}: only that of a number loads '
                          '(no fields, sub-arrays, sizes or flags)')
        self.dtype = numeric_dtype(_dtype_of(self).str[1:], state[1])

    def __reduce__(self):
        return np.dtype, (self.dtype.str,)

    def __repr__(self) -> str:
        return f'PickledDtype({vars(self).get("dtype")!r})'


def _dtype_of(spec: Any) -> np.dtype:
    """The numpy dtype of a :class:`PickledDtype` made by its constructor."""
    if type(spec) is not PickledDtype or 'dtype' not in vars(spec):
        raise _refuse(f'numpy value whose dtype is a {type(spec).__name__}')
    return spec.dtype


class LoadedArray(np.ndarray):
    """Stands in for ``numpy.ndarray``: the array a pickle's ``_reconstruct`` creates, whose
    state (shape, dtype, order, bytes) is checked by :func:`check_array`. Calling it with
    arguments (numpy's ``ndarray(shape, dtype, buffer, offset, strides)``) is refused. It
    behaves as, and pickles again as, a plain ndarray."""

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _refuse('numpy.ndarray(...) called with arguments (buffer, offset, strides)')
        return np.ndarray.__new__(cls, (0,), np.uint8)

    def __setstate__(self, state: Any) -> None:
        if self.shape != (0,):
            raise _refuse('numpy array state restored twice')
        if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int
                and state[0] == 1):
            raise _refuse(f'numpy array state of {type(state).__name__}')
        _, shape, spec, fortran, raw = state
        dtype = _dtype_of(spec)
        check_array(shape, dtype, fortran, raw)
        np.ndarray.__setstate__(self, (1, shape, dtype, fortran, raw))

    def __reduce_ex__(self, protocol):
        return np.asarray(self).__reduce_ex__(protocol)

    def __reduce__(self):
        return np.asarray(self).__reduce__()


def reconstruct(subtype: Any, shape: Any, code: Any) -> LoadedArray:
    """Stands in for numpy's ``_reconstruct(ndarray, (0,), b'b')``, which pickles start an
    array with: an empty :class:`LoadedArray`, whose state is checked when restored."""
    if not (subtype is LoadedArray and type(shape) is tuple and len(shape) == 1
            and type(shape[0]) is int and shape[0] == 0 and type(code) is bytes
            and code == b'b'):
        raise _refuse(f'numpy _reconstruct({subtype!r}, {shape!r}, {code!r})')
    return LoadedArray()


def scalar(spec: Any, raw: Any = None) -> np.generic:
    """Stands in for numpy's ``scalar(dtype, bytes)``: a numpy number, checked by
    :func:`numeric_scalar`."""
    return numeric_scalar(_dtype_of(spec), raw)


def empty_bytes(*args: Any) -> bytes:
    """Stands in for ``builtins.bytes``, which protocol-2 pickles call (with no arguments)
    for the empty bytes of an empty numpy array."""
    if args:
        raise _refuse(f'bytes called with {len(args)} arguments')
    return b''


#: HistoryBuffer's statistics methods, which its pickles name through getattr.
_STATISTICS = {name: method for name, method in vars(HistoryBuffer).items()
               if not name.startswith('_') and callable(method)}


def history_buffer_method(owner: Any, name: Any):
    """Stands in for ``builtins.getattr``: a HistoryBuffer pickles its statistics methods
    as ``getattr(HistoryBuffer, 'mean')`` and so on. Allowing the real ``getattr`` would let
    a file reach any attribute of any allowed object, so only HistoryBuffer's public methods
    can be looked up through this one."""
    if (owner is LoadedHistoryBuffer or owner is HistoryBuffer) and type(name) is str \
            and name in _STATISTICS:
        return _STATISTICS[name]
    owner_name = getattr(owner, '__qualname__', type(owner).__qualname__)
    if owner is LoadedHistoryBuffer:
        owner_name = 'HistoryBuffer'
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL builtins.getattr({owner_name},{name!r}) was not '
        'allowed: only the statistics methods of mmengine\'s HistoryBuffer can be looked up.')


class LoadedHistoryBuffer:
    """Stands in for mmengine's ``HistoryBuffer``: its restored state may hold the logged
    values and counts (numeric arrays of one length), ``max_length`` and the statistics
    methods (HistoryBuffer's own, each under its name). The object then becomes a
    HistoryBuffer made by HistoryBuffer's constructor from those numbers; nothing the file
    holds reaches the class."""

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _refuse('HistoryBuffer created with arguments')
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or not set(state) <= {
                'max_length', '_log_history', '_count_history', 'statistics_methods'}:
            raise _refuse('HistoryBuffer state other than its logged numbers: '
                          f'{list(state)[:6] if type(state) is dict else type(state).__name__}')
        methods = state.get('statistics_methods', {})
        if type(methods) is not dict or any(
                _STATISTICS.get(name) is not method for name, method in methods.items()):
            raise _refuse('HistoryBuffer statistics other than its own methods under their '
                          'names (they would change every HistoryBuffer of the process)')
        logs, counts = state.get('_log_history'), state.get('_count_history')
        max_length = state.get('max_length', 1000000)
        if not (type(logs) is LoadedArray and type(counts) is LoadedArray
                and logs.ndim == counts.ndim == 1 and len(logs) == len(counts)
                and type(max_length) is int and max_length > 0):
            raise _refuse('HistoryBuffer state without two numeric sequences of one length '
                          'and a positive max_length')
        self.__class__ = HistoryBuffer
        HistoryBuffer.__init__(self, np.asarray(logs), np.asarray(counts), max_length)


def stand_ins() -> list:
    """What :func:`allow_mmengine_checkpoints` adds to torch's allow-list: each stand-in
    with the name pickles call it by (numpy 2 writes ``numpy._core``, numpy 1 wrote
    ``numpy.core``)."""
    entries = [(PickledDtype, 'numpy.dtype'), (LoadedArray, 'numpy.ndarray'),
               (LoadedHistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
               (history_buffer_method, 'builtins.getattr'), (empty_bytes, 'builtins.bytes')]
    entries += [(function, f'{module}.multiarray.{name}')
                for function, name in ((reconstruct, '_reconstruct'), (scalar, 'scalar'))
                for module in ('numpy._core', 'numpy.core')]
    return entries


# --------------------------------------------------------------------------------------------
# Readable errors from mmengine's loaders
# --------------------------------------------------------------------------------------------
#: Parts of torch's safe-loading messages that mean the file asks for something to be
#: imported or called, or holds what the stand-ins refuse (rather than being no pickle).
_REFUSAL = re.compile(r'GLOBAL|call reduce|Can only build|Can only create|' + re.escape(REFUSED))


def torch_complaint(error: Exception) -> str:
    """The line of a safe-loading error that says what the unpickler met; torch's message
    wraps it in a header and a pointer to its documentation."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 2 else (lines or [''])[-1]


def refusal_message(filename: str, error: Exception) -> str:
    """Why safe loading refused ``filename``, from torch's, a stand-in's or getattr's
    message."""
    found = re.search(r'GLOBAL (\S+)', str(error))
    stand_in = re.search(re.escape(REFUSED) + r' (.*)', str(error))
    if stand_in and not found:
        asked = f'it holds what safe loading refuses: {stand_in.group(1).strip()}'
    elif found:
        asked = f'loading it would run code (it asks to import and call ' \
                f'{found.group(1).rstrip(".,")})'
    else:
        asked = f'loading it would run code (torch says: {torch_complaint(error)})'
    return (f'{filename} was refused: {asked}. Checkpoints are loaded with torch\'s safe '
            'loading, which allows only tensors, containers, numbers, numeric numpy values '
            'and mmengine\'s logging buffers. Load only files from a source you trust. One '
            'of the authors\' released MMDetection 2.x / MMSegmentation 0.x checkpoints can '
            'be converted once, without running anything in it: python '
            'tools/model_converters/convert_released_checkpoint.py '
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


def _unreadable(filename: str, reason: str) -> str:
    return (f'{filename} cannot be loaded as a checkpoint: {reason}. Give a file written by '
            'torch.save or by a training run (epoch_N.pth, iter_N.pth); a copy cut short '
            '(a full disk, a killed job, an interrupted download) must be written again.')


def _in_safe_unpickler(error: Exception) -> bool:
    """Whether ``error`` was raised by torch's safe unpickler itself (a malformed or crafted
    pickle, e.g. a REDUCE on a number), not by something it called."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and \
        frame.tb_frame.f_code.co_filename.endswith('_weights_only_unpickler.py')


def readable_load_checkpoint(load_checkpoint):
    """``CheckpointLoader.load_checkpoint`` (the function under its classmethod), raising
    :class:`CheckpointRefusedError` where safe loading refuses the file and
    :class:`CheckpointUnreadableError` where the file is no sound checkpoint; a file mmengine
    would download (``http(s)://`` or a model zoo's name) is first downloaded with
    :func:`.download_timeout.cache_url`."""
    def load(cls, filename, map_location=None, logger='current'):
        local = filename
        url = model_zoo_url(filename) if isinstance(filename, str) else None
        if url is not None:
            local = cache_url(url)  # then mmengine's loader finds it in the cache
        try:
            return load_checkpoint(cls, filename, map_location, logger)
        except ReadableError:
            raise
        except pickle.UnpicklingError as error:
            if _REFUSAL.search(str(error)):
                raise CheckpointRefusedError(refusal_message(filename, error)) from None
            reason = unreadable_reason(local, error) or f'torch says: {torch_complaint(error)}'
            raise CheckpointUnreadableError(_unreadable(filename, reason)) from None
        except Exception as error:
            reason = unreadable_reason(local, error)
            if reason is None and _in_safe_unpickler(error):
                reason = f'its pickle is malformed ({type(error).__name__}: {error})'
            if reason is None:
                raise
            raise CheckpointUnreadableError(_unreadable(filename, reason)) from None
    load.mmconvmlp_wraps = load_checkpoint
    return load


def allow_mmengine_checkpoints() -> None:
    """Add :func:`stand_ins` to torch's safe-loading allow-list and make
    ``CheckpointLoader.load_checkpoint`` give readable errors (see the module). Safe loading
    stays on. Called when mmconvmlp is imported; calling it again, or after a reload of this
    module, leaves one stand-in per name and one wrapper."""
    names = {name for _, name in stand_ins()}
    earlier = [entry for entry in torch.serialization.get_safe_globals()
               if isinstance(entry, tuple) and entry[1] in names
               and getattr(entry[0], '__module__', None) == __name__]
    if earlier:  # a reload: the entries of this module's previous copy go
        kept = [entry for entry in torch.serialization.get_safe_globals()
                if entry not in earlier]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(kept)
    torch.serialization.add_safe_globals(stand_ins())
    current = CheckpointLoader.__dict__['load_checkpoint'].__func__
    original = getattr(current, 'mmconvmlp_wraps', current)
    CheckpointLoader.load_checkpoint = classmethod(readable_load_checkpoint(original))
