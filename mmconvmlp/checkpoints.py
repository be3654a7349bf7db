"""Reading the authors' released detection and segmentation checkpoints safely, and turning
them into checkpoints that today's MMDetection 3.x / MMSegmentation 1.x load.

The released COCO and ADE20K checkpoints were written by MMDetection 2.x and MMSegmentation
0.x: a dict with ``state_dict`` (``backbone.*`` in the authors' names, ``neck.*``, then
``bbox_head.*``, ``rpn_head.*`` + ``roi_head.*`` or ``decode_head.*``), ``meta`` and
``optimizer``. Two things stand between them and ``tools/test.py`` on today's stack:

* **The pickle.** ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, and
  refuses any ``meta`` that holds objects other than tensors and plain containers (mmcv
  ``Config`` objects, other classes; ``tools/test.py`` additionally allows numpy scalars and
  arrays, so a file with only those loads there as downloaded).
  :func:`load_checkpoint_safely` tries ``weights_only=True`` first; when that refuses, it
  unpickles again with a restricted unpickler that resolves only the globals torch's
  ``weights_only`` mode allows and replaces every other global with an inert
  :class:`UnloadedGlobal` placeholder. Nothing named in the
  file is imported or called, so a malicious global (``os.system``, ...) is never run, and
  pickled state is restored only into the placeholders and dicts it creates, never into a
  class or function the file names.
* **Parameter names.** Between MMDetection 2.x and 3.x, and between MMSegmentation 0.x and
  1.x, the modules these models use kept their parameter names: FPN (``lateral_convs``,
  ``fpn_convs``), RetinaHead (``cls_convs``, ``reg_convs``, ``retina_cls``, ``retina_reg``),
  RPNHead (``rpn_conv``, ``rpn_cls``, ``rpn_reg``), the Mask R-CNN RoI heads
  (``bbox_head.shared_fcs``/``fc_cls``/``fc_reg``, ``mask_head.convs``/``upsample``/
  ``conv_logits``) and the Semantic FPN head (``scale_heads``, ``conv_seg``). The backbone
  carries the authors' names, which :class:`~mmconvmlp.models.ConvMLP` uses, and mmcv 1.x
  saved the state dict of the unwrapped model (no ``module.`` prefix). So nothing is
  renamed: the conversion keeps the names and *checks* them against the model the matching
  config builds, since ``tools/test.py`` loads non-strictly and would otherwise ignore a
  wrong name silently (``tests/test_checkpoints.py`` writes the old names from those
  releases' module definitions).

:func:`convert_released_checkpoint` writes a plain ``{'state_dict', 'meta'}`` checkpoint that
``torch.load(weights_only=True)`` accepts; ``tools/model_converters/convert_released_checkpoint.py``
is its command line.
"""
import io
import os
import os.path as osp
import pickle
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import torch

from .config_models import build_config_model
from .engine.safe_loading import (CheckpointRefusedError, PickledDtype, numeric_array,
                                  numeric_scalar)
from .models.convmlp import ARCH_SETTINGS
from .models.weights import CheckpointMismatchError, _listing, describe_mismatch

__all__ = [
    'UnloadedGlobal', 'load_checkpoint_safely', 'to_plain', 'numpy_value', 'KNOWN_PREFIXES',
    'model_entries', 'infer_model', 'matching_config',
    'check_against_config', 'convert_released_checkpoint', 'ConversionReport',
]

#: Top-level modules of the released detectors and segmentors.
KNOWN_PREFIXES = ('backbone.', 'neck.', 'bbox_head.', 'rpn_head.', 'roi_head.',
                  'decode_head.', 'auxiliary_head.')
#: The ImageNet classifier, should a backbone in a checkpoint still carry it: dropped.
BACKBONE_CLASSIFIER = ('backbone.head.', 'backbone.norm.')

#: Config files of the paper's models, relative to the repository root, by (family, arch).
CONFIG_PATTERNS = {
    'retinanet': 'configs/detection/retinanet_convmlp_{arch}_coco.py',
    'mask_rcnn': 'configs/detection/mask_rcnn_convmlp_{arch}_coco.py',
    'fpn': 'configs/segmentation/fpn_convmlp_{arch}_ade20k.py',
}


# --------------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------------
class UnloadedGlobal:
    """Stands in for a pickled global that was not loaded (a class or function outside
    torch's ``weights_only`` allowlist). Calling it, instantiating it or restoring state into
    it only records the arguments; nothing is imported or executed."""

    #: ``module.name`` of the global this class replaces (set on each generated subclass).
    global_name = '?'

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items: Dict[Any, Any] = {}
        obj.elements: List[Any] = []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    # dict and list subclasses are pickled with SETITEMS / APPENDS on the instance
    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f'<not loaded: {self.global_name}>'


def _placeholder(full_name: str) -> type:
    return type(f'Unloaded[{full_name}]', (UnloadedGlobal,), {'global_name': full_name})


def _allowed_globals() -> Mapping[str, Any]:
    """The globals that torch's own ``weights_only`` unpickler resolves."""
    from torch import _weights_only_unpickler
    return _weights_only_unpickler._get_allowed_globals()


def _restore_state(unpickler: pickle.Unpickler) -> None:
    """BUILD (restore pickled state into the object below it) for the objects the
    restricted unpickler creates itself: its placeholders (which only record the state)
    and plain OrderedDicts (a state dict's ``_metadata``). Anything else (a class, a
    function, a tensor that torch's allow-list let through) is refused: its state would
    come from the file."""
    stack = unpickler.stack
    state, target = stack.pop(), stack[-1]
    if isinstance(target, UnloadedGlobal):
        target.__setstate__(state)
    elif type(target) is OrderedDict and type(state) is dict \
            and all(type(key) is str for key in state):
        target.__dict__.update(state)
    else:
        name = getattr(target, '__qualname__', None) or type(target).__qualname__
        raise pickle.UnpicklingError(
            f'the pickle restores state into {name} ({type(target).__name__}), which the '
            'converter allows only for the objects it creates')


def _restricted_pickle_module(unloaded: Set[str]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler resolves only the globals of
    :func:`_allowed_globals`, records every other one in ``unloaded`` while handing back
    an inert placeholder class, and restores state only into what it created
    (:func:`_restore_state`). It is Python's own unpickler (``pickle._Unpickler``) with
    those two steps replaced."""
    allowed = _allowed_globals()
    placeholders: Dict[str, type] = {}

    class RestrictedUnpickler(pickle._Unpickler):
        dispatch = dict(pickle._Unpickler.dispatch)
        dispatch[pickle.BUILD[0]] = _restore_state

        def find_class(self, module: str, name: str):
            full_name = f'{module}.{name}'
            if full_name in allowed:
                return allowed[full_name]
            unloaded.add(full_name)
            if full_name not in placeholders:
                placeholders[full_name] = _placeholder(full_name)
            return placeholders[full_name]

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs):
        return load(io.BytesIO(data), **kwargs)

    module = types.ModuleType('mmconvmlp_restricted_pickle')
    module.Unpickler = RestrictedUnpickler
    module.load, module.loads = load, loads
    module.UnpicklingError = pickle.UnpicklingError
    return module


def load_checkpoint_safely(path: str) -> Tuple[Any, List[str]]:
    """Load a checkpoint file without running anything it names.

    Returns ``(object, unloaded)``: ``unloaded`` lists, sorted, the globals (``module.name``)
    that were replaced by :class:`UnloadedGlobal` placeholders; it is empty when
    ``torch.load(weights_only=True)`` accepted the file as it is. Tensors load as usual.
    Raises :class:`~mmconvmlp.engine.safe_loading.CheckpointRefusedError` for a pickle that
    would restore state into anything but the placeholders and dicts it creates."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True), []
    except pickle.UnpicklingError:
        pass
    unloaded: Set[str] = set()
    try:
        obj = torch.load(path, map_location='cpu', weights_only=False,
                         pickle_module=_restricted_pickle_module(unloaded))
    except pickle.UnpicklingError as error:
        raise CheckpointRefusedError(f'{path} was refused: {error}. Nothing in it was run; '
                                     'it is no checkpoint the converter reads.') from None
    return obj, sorted(unloaded)


def _numpy_dtype(obj: Any) -> Optional[np.dtype]:
    """The numeric numpy dtype a pickled ``numpy.dtype`` placeholder describes, or None
    (checked as safe loading checks it: numbers only, no fields, sub-arrays or flags)."""
    if not (isinstance(obj, UnloadedGlobal) and obj.global_name == 'numpy.dtype'
            and obj.args):
        return None
    try:
        spec = PickledDtype(obj.args[0])
        if obj.state is not None:
            spec.__setstate__(obj.state)
    except pickle.UnpicklingError:
        return None
    return spec.dtype


def numpy_value(obj: UnloadedGlobal) -> Any:
    """The Python number or nested list behind a placeholder of a pickled numeric numpy
    scalar or array, read from its raw bytes with the checks of safe loading (numpy never
    unpickles anything); None for anything else."""
    name = obj.global_name
    try:
        if name in ('numpy._core.multiarray.scalar', 'numpy.core.multiarray.scalar') \
                and len(obj.args) == 2:
            dtype = _numpy_dtype(obj.args[0])
            return None if dtype is None else numeric_scalar(dtype, obj.args[1]).item()
        if name in ('numpy._core.multiarray._reconstruct',
                    'numpy.core.multiarray._reconstruct') and type(obj.state) is tuple \
                and len(obj.state) == 5:
            _, shape, dtype, fortran, raw = obj.state
            dtype = _numpy_dtype(dtype)
            return None if dtype is None else numeric_array(shape, dtype, fortran,
                                                            raw).tolist()
    except pickle.UnpicklingError:
        return None
    return None


_PLAIN_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.dtype,
                 torch.device, torch.Size)


def to_plain(obj: Any) -> Any:
    """``obj`` made of what ``torch.load(weights_only=True)`` accepts: containers are
    rebuilt as dict / list / tuple, tensors and scalars are kept, numeric numpy scalars and
    arrays become numbers and lists (:func:`numpy_value`), anything else (e.g. an
    :class:`UnloadedGlobal`) becomes its ``repr`` string."""
    if isinstance(obj, _PLAIN_LEAVES) and not isinstance(obj, UnloadedGlobal):
        return obj
    if isinstance(obj, UnloadedGlobal):
        value = numpy_value(obj)
        return repr(obj) if value is None else value
    if isinstance(obj, type) and issubclass(obj, UnloadedGlobal):
        return f'<not loaded: {obj.global_name}>'
    if isinstance(obj, Mapping):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [to_plain(v) for v in obj]
    return repr(obj)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What a conversion did and what it could not do, by name."""
    source: str = ''
    unloaded_globals: List[str] = field(default_factory=list)
    dropped_classifier: List[str] = field(default_factory=list)
    dropped_top_level: List[str] = field(default_factory=list)
    unmapped: List[str] = field(default_factory=list)
    family: Optional[str] = None
    arch: Optional[str] = None
    config: Optional[str] = None
    checked: bool = False

    def summary(self) -> str:
        lines = [f'source: {self.source}',
                 f'model: {self.family or "unknown"} with ConvMLP-{(self.arch or "?").upper()}']
        if self.config:
            lines.append(f'names and shapes checked against: {self.config}'
                         if self.checked else f'config: {self.config} (not checked)')
        else:
            lines.append('names and shapes NOT checked against a config')
        if self.unloaded_globals:
            lines.append('meta objects not unpickled (kept as text): '
                         + ', '.join(self.unloaded_globals))
        if self.dropped_top_level:
            lines.append('dropped: ' + ', '.join(self.dropped_top_level))
        text = '\n'.join(lines) + '\n'
        text += _listing('ImageNet classifier entries dropped', self.dropped_classifier)
        text += _listing('entries that cannot be mapped', self.unmapped)
        return text


def model_entries(state_dict: Mapping[str, Any], report: ConversionReport
                  ) -> 'OrderedDict[str, torch.Tensor]':
    """The old ``state_dict``'s entries that today's model takes (the names are the same).
    Entries outside :data:`KNOWN_PREFIXES` and entries that are not tensors go to
    ``report.unmapped``; a backbone's ImageNet classifier goes to
    ``report.dropped_classifier``."""
    mapped: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for name, value in state_dict.items():
        if name.startswith(BACKBONE_CLASSIFIER):
            report.dropped_classifier.append(name)
        elif not isinstance(value, torch.Tensor):
            report.unmapped.append(f'{name} (a {type(value).__name__}, not a tensor)')
        elif not name.startswith(KNOWN_PREFIXES):
            report.unmapped.append(f'{name} (not part of a detector or segmentor)')
        else:
            mapped[name] = value
    return mapped


def infer_model(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Optional[str], Optional[str]]:
    """``(family, arch)`` of a detector/segmentor state dict in today's names: family one of
    ``'retinanet'``, ``'mask_rcnn'``, ``'fpn'``; arch one of ``'s'``, ``'m'``, ``'l'``. Either
    is ``None`` when the weights do not tell."""
    names = set(state_dict)
    if any(n.startswith('roi_head.mask_head.') for n in names) and \
            any(n.startswith('rpn_head.') for n in names):
        family = 'mask_rcnn'
    elif any(n.startswith('bbox_head.retina_') for n in names):
        family = 'retinanet'
    elif any(n.startswith('decode_head.scale_heads.') for n in names):
        family = 'fpn'
    else:
        family = None
    blocks = []
    for stage in range(3):
        found = {int(m.group(1)) for n in names
                 for m in [re.match(rf'backbone\.stages\.{stage}\.blocks\.(\d+)\.', n)] if m}
        blocks.append(max(found) + 1 if found else 0)
    conv_blocks = {int(m.group(1)) for n in names
                   for m in [re.match(r'backbone\.conv_stages\.conv_blocks\.(\d+)\.', n)] if m}
    stem = state_dict.get('backbone.tokenizer.block.6.weight')
    arch = None
    for key, settings in ARCH_SETTINGS.items():
        if (tuple(blocks) == tuple(settings['blocks'])
                and len(conv_blocks) == settings['conv_blocks']
                and stem is not None and stem.shape[0] == settings['stem_width']):
            arch = key
    return family, arch


def matching_config(family: Optional[str], arch: Optional[str],
                    root: Optional[str] = None) -> Optional[str]:
    """The repository's config for ``(family, arch)``, or ``None`` if it has none."""
    if family not in CONFIG_PATTERNS or arch is None:
        return None
    root = root or osp.dirname(osp.dirname(osp.abspath(__file__)))
    path = osp.join(root, CONFIG_PATTERNS[family].format(arch=arch))
    return path if osp.isfile(path) else None


def check_against_config(state_dict: Mapping[str, torch.Tensor], config: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming every entry of the model built from
    ``config`` that ``state_dict`` lacks or mis-shapes, and every entry it has in excess."""
    listing = describe_mismatch(build_config_model(config).state_dict(), state_dict)
    if listing:
        raise CheckpointMismatchError(
            f'The converted weights do not fit the model of {config}:\n{listing}')


def _new_meta(meta: Any, report: ConversionReport) -> Dict[str, Any]:
    meta = to_plain(meta) if isinstance(meta, Mapping) else {}
    dataset_meta = dict(meta.get('dataset_meta') or {})
    for old, new in (('CLASSES', 'classes'), ('PALETTE', 'palette')):
        if old in meta and new not in dataset_meta:
            dataset_meta[new] = meta[old]
    if dataset_meta:
        meta['dataset_meta'] = dataset_meta
    meta['converted_from'] = osp.basename(report.source)
    meta['converted_by'] = 'mmconvmlp.checkpoints.convert_released_checkpoint'
    if report.unloaded_globals:
        meta['unloaded_globals'] = list(report.unloaded_globals)
    return meta


def convert_released_checkpoint(src: str, dst: str, config: Optional[str] = None,
                                check: bool = True, allow_unmapped: bool = False
                                ) -> ConversionReport:
    """Read ``src`` (a released MMDetection 2.x / MMSegmentation 0.x checkpoint) safely and
    write ``dst``: ``{'state_dict': weights in today's names, 'meta': plain metadata}``, which
    ``torch.load(weights_only=True)`` and ``tools/test.py`` load. The optimizer state is not
    carried over.

    ``config`` is the config the weights are for; by default the repository's config that
    matches the weights (family and arch are read off the names and shapes). With ``check``
    the names and shapes must fit the model it builds. Raises
    :class:`CheckpointMismatchError` naming what does not fit, and, unless
    ``allow_unmapped``, naming what cannot be mapped; nothing is written then."""
    report = ConversionReport(source=src)
    checkpoint, report.unloaded_globals = load_checkpoint_safely(src)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f'{src} holds a {type(checkpoint).__name__}, not a '
                                      f'checkpoint dict.')
    if isinstance(checkpoint.get('state_dict'), Mapping):
        old_state = checkpoint['state_dict']
        report.dropped_top_level = sorted(k for k in checkpoint if k not in ('state_dict',
                                                                               'meta'))
    else:
        old_state, checkpoint = checkpoint, {}
    state_dict = model_entries(old_state, report)
    if report.unmapped and not allow_unmapped:
        raise CheckpointMismatchError(
            f'{src}: some entries cannot be mapped to a detector or segmentor (pass '
            f'--allow-unmapped to drop them):\n' + _listing('cannot be mapped', report.unmapped))
    report.family, report.arch = infer_model(state_dict)
    report.config = config or matching_config(report.family, report.arch)
    if check:
        if report.config is None:
            raise CheckpointMismatchError(
                f'{src}: no config to check the weights against (read off the weights: '
                f'{report.family or "unknown model"}, arch {report.arch or "unknown"}); pass '
                f'one, or skip the check.')
        check_against_config(state_dict, report.config)
        report.checked = True
    out = {'state_dict': state_dict, 'meta': _new_meta(checkpoint.get('meta'), report)}
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(out, dst)
    return report

