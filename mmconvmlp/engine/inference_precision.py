"""Inference in the precision the machine runs fast, for any mmdet detector or mmseg segmentor.

:func:`choose_inference_dtype` picks, for ``precision='auto'``:

* CPU: bfloat16 where the training probe (:func:`~mmconvmlp.engine.precision.cpu_bfloat16_speed`)
  finds it faster than float32 (CPUs with AVX512-BF16 or AMX), else float32 (CPUs that emulate
  bfloat16, hundreds of times slower);
* CUDA: bfloat16 on GPUs of compute capability 8.0 and newer, float16 on older ones.

:func:`run_network_in` runs the network of a model in that dtype: the backbone, the neck and
the ``forward`` of every head (a module with ``predict_by_feat``: dense heads, RoI heads' box
and mask heads, decode heads) under ``torch.autocast``, their outputs handed on in float32. So
everything between and after them stays float32: RoI feature extraction, box decoding, NMS,
mask pasting and the resizing of segmentation logits (mmcv's CPU NMS and RoIAlign have no
bfloat16 kernels). :func:`prepare_inference` does both, and on the CPU also applies ConvMLP's
inference speed layer and routes mmcv's RoIAlign through torchvision
(:mod:`mmconvmlp.engine.cpu_roi_align`).
"""
import functools
import warnings
from typing import List, Optional, Tuple

import torch

from .readable_errors import UsageError

PRECISIONS = ('auto', 'float32', 'bfloat16', 'float16')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def cuda_bfloat16_native(device: torch.device) -> bool:
    """Whether the GPU has bfloat16 units (compute capability 8.0+, Ampere and newer)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_inference_dtype(device: torch.device, precision: str = 'auto'
                           ) -> Tuple[torch.dtype, str]:
    """``(dtype, why)`` for running a model's network on ``device``; ``torch.float32`` means
    no autocast. ``precision`` is one of :data:`PRECISIONS`. Raises :class:`UsageError` for a
    precision the device cannot run."""
    if precision not in PRECISIONS:
        raise UsageError(f'--precision {precision}: give one of {", ".join(PRECISIONS)}.')
    if precision == 'float32':
        return torch.float32, 'float32 (--precision float32)'
    if device.type == 'cuda':
        native = cuda_bfloat16_native(device)
        if precision == 'bfloat16' and not native:
            raise UsageError(f'--precision bfloat16: {torch.cuda.get_device_name(device)} has '
                             f'no bfloat16 units (compute capability 8.0 or newer needed); '
                             f'use --precision auto (float16 there) or float32.')
        if precision == 'auto':
            return ((torch.bfloat16, 'bfloat16 (auto: this GPU has bfloat16 units)') if native
                    else (torch.float16, 'float16 (auto: this GPU has no bfloat16 units)'))
        return DTYPES[precision], f'{precision} (--precision {precision})'
    if device.type != 'cpu':
        raise UsageError(f'--precision is for cpu and cuda devices, not {device.type}.')
    if precision == 'float16':
        raise UsageError('--precision float16 needs a GPU; on a CPU use auto, bfloat16 or '
                         'float32.')
    from .precision import cpu_bfloat16_speed
    ratio = cpu_bfloat16_speed()
    if ratio < 1:
        measured = f'a bfloat16 probe ran {1 / ratio:.1f}x as fast as float32 on this CPU'
    else:
        measured = f'a bfloat16 probe ran {ratio:.0f}x slower than float32 on this CPU'
    if precision == 'bfloat16':
        if ratio >= 1:
            warnings.warn(f'--precision bfloat16 is forced, but this CPU emulates bfloat16: '
                          f'{measured}. Use --precision auto or float32.')
        return torch.bfloat16, f'bfloat16 (--precision bfloat16; {measured})'
    if ratio < 1:
        return torch.bfloat16, f'bfloat16 (auto: {measured})'
    return torch.float32, f'float32 (auto: {measured}, no bfloat16 units)'


def network_parts(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the parts of ``model`` that are network, not post-processing:
    every ``backbone`` and ``neck``, and every head (a module with ``predict_by_feat``,
    whose ``forward`` is its network and ``predict_by_feat`` its post-processing); the
    outermost only, so a part inside another is not listed again. Works through wrappers
    (``module`` of DDP, test-time augmentation)."""
    parts = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + '.') for outer, _ in parts):
            continue
        attribute = name.rsplit('.', 1)[-1]
        if attribute in ('backbone', 'neck') or hasattr(module, 'predict_by_feat'):
            parts.append((name, module))
    return parts


def to_float32(value):
    """``value`` with every floating tensor in it (inside tuples, lists and dicts) float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_float32(item) for item in value)
    if isinstance(value, dict):
        return type(value)((key, to_float32(item)) for key, item in value.items())
    return value


def run_network_in(model: torch.nn.Module, dtype: torch.dtype) -> List[str]:
    """Run the :func:`network_parts` of ``model`` under autocast to ``dtype`` on the device
    of its parameters, each part's outputs handed on in float32; returns the parts' names.
    float32 changes nothing."""
    if dtype == torch.float32:
        return []
    device_type = next(model.parameters()).device.type
    parts = network_parts(model)
    for _, module in parts:
        forward = module.forward

        @functools.wraps(forward)
        def forward_autocast(*args, _forward=forward, **kwargs):
            with torch.autocast(device_type, dtype=dtype):
                return to_float32(_forward(*args, **kwargs))

        module.forward = forward_autocast
    return [name for name, _ in parts]


def prepare_inference(model: torch.nn.Module, precision: str = 'auto',
                      device: Optional[torch.device] = None) -> str:
    """Set ``model`` (an mmdet detector or mmseg segmentor, possibly wrapped) up for
    inference on ``device`` (default: that of its parameters) in ``precision``, and return
    one line saying what runs how: the dtype chosen and why, and on the CPU how many of
    mmcv's RoIAlign layers now run torchvision's kernel. On the CPU, ConvMLP's inference
    speed layer (:func:`~mmconvmlp.models.cpu_speed.accelerate_for_cpu_inference`) is
    applied too."""
    from ..models.cpu_speed import accelerate_for_cpu_inference
    from .cpu_roi_align import use_torchvision_roi_align
    if device is None:
        device = next(model.parameters()).device
    dtype, why = choose_inference_dtype(device, precision)
    line = why
    if device.type == 'cpu':
        # ConvMLP's bands and fused calls: module classes swapped before any forward is
        # wrapped below, so the wrappers call the fast classes' forward
        accelerate_for_cpu_inference(model)
    if dtype != torch.float32:
        run_network_in(model, dtype)
        line += '; backbone, neck and heads in ' + str(dtype).split('.')[1] + \
                ' autocast, post-processing in float32'
    if device.type == 'cpu':
        swapped = use_torchvision_roi_align(model)
        if swapped:
            line += f'; {swapped} RoIAlign layers on torchvision\'s CPU kernel'
    return line
