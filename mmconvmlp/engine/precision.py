"""Mixed precision chosen by what the machine runs fast.

``MixedPrecisionOptimWrapper`` (an ``optim_wrapper`` type) builds, for the device the model
is on:

* CUDA: mmengine's ``AmpOptimWrapper``, in bfloat16 where the GPU supports it (Ampere and
  newer), else in float16 with dynamic loss scaling;
* CPU: :class:`BF16AutocastOptimWrapper` where a short probe (:func:`cpu_bfloat16_speed`)
  finds bfloat16 faster than float32 (CPUs with AVX512-BF16 or AMX), else a plain
  ``OptimWrapper`` in float32: CPUs without bfloat16 units (AVX2 ones, most laptops) emulate
  it hundreds of times slower.

It logs one line saying which it chose and why. ``precision='bfloat16'`` or ``'float32'``
forces a choice (``--cfg-options optim_wrapper.precision=float32``); forcing bfloat16 where
the probe finds it emulated warns how much slower it measured.
"""
import functools
import warnings
from contextlib import contextmanager
from typing import Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..machine import best_thread_time

PRECISIONS = ('auto', 'bfloat16', 'float16', 'float32')


@OPTIM_WRAPPERS.register_module()
class BF16AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose ``optim_context`` (the forward pass and the loss of a training
    step) runs under ``torch.autocast`` with bfloat16 on the model's device, the CPU
    included (mmengine's ``AmpOptimWrapper`` refuses to start without a GPU). bfloat16 has
    float32's exponent range, so no loss scaling is needed; weights, gradients and optimizer
    states stay float32. :class:`MixedPrecisionOptimWrapper` picks it where it pays."""

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else 'cpu'
        with super().optim_context(model), \
                torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            yield


@functools.lru_cache(maxsize=None)
def cpu_bfloat16_speed() -> float:
    """How many times longer a small convolution (2x64x24x24, 3x3) plus a 256x256 matrix
    product take under bfloat16 autocast than in float32 on this CPU: about 0.1-0.6 where the
    CPU has bfloat16 units, 3-15 where it emulates them. Best of 5 runs by CPU time on one
    thread (with several, a thread that the OS delays on a busy machine would swamp kernels
    this short);
    a few milliseconds, about 100 ms where bfloat16 is emulated; measured once per process."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 64, 24, 24, generator=gen).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3, generator=gen).contiguous(
        memory_format=torch.channels_last)
    tokens = torch.randn(256, 256, generator=gen)
    matrix = torch.randn(256, 256, generator=gen)

    def work() -> torch.Tensor:
        return F.conv2d(image, weight, padding=1).sum() + F.linear(tokens, matrix).sum()

    def work_bf16() -> torch.Tensor:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return work()

    with torch.no_grad():
        return best_thread_time(work_bf16, 5) / best_thread_time(work, 5)


def choose_cpu_precision(precision: str = 'auto') -> Tuple[torch.dtype, str]:
    """The autocast dtype for training on this CPU (``torch.float32``: no autocast), and
    why, for ``precision`` ``'auto'``, ``'bfloat16'`` or ``'float32'``."""
    if precision == 'float32':
        return torch.float32, 'float32 as the config asks (precision=float32)'
    if precision == 'float16':
        raise ValueError('MixedPrecisionOptimWrapper: precision=float16 needs a GPU; on a '
                         'CPU use precision=auto, bfloat16 or float32.')
    ratio = cpu_bfloat16_speed()
    native = ratio < 1.
    measured = (f'a bfloat16 probe ran {1 / ratio:.1f}x as fast as float32 on this CPU'
                if native else
                f'a bfloat16 probe ran {ratio:.0f}x slower than float32 on this CPU')
    if precision == 'bfloat16':
        if not native:
            warnings.warn(
                f'precision=bfloat16 is forced, but this CPU has no fast bfloat16: {measured} '
                f'(it emulates bfloat16), so training will be about that much slower. Use '
                f'precision=auto or float32 (--cfg-options optim_wrapper.precision=auto).')
        return torch.bfloat16, f'bfloat16 as the config asks (precision=bfloat16; {measured})'
    if native:
        return torch.bfloat16, f'bfloat16 autocast, since {measured}'
    return torch.float32, f'float32, since {measured} (no bfloat16 units)'


@OPTIM_WRAPPERS.register_module(name='MixedPrecisionOptimWrapper')
def mixed_precision_optim_wrapper(optimizer: torch.optim.Optimizer, precision: str = 'auto',
                                  **kwargs) -> OptimWrapper:
    """Build the optimizer wrapper that trains in the fastest precision the model's device
    runs natively (see the module docs). ``kwargs`` go to the wrapper (``clip_grad``,
    ``accumulative_counts``; ``loss_scale`` on CUDA)."""
    if precision not in PRECISIONS:
        raise ValueError(f'MixedPrecisionOptimWrapper: precision={precision!r} is not one of '
                         f'{PRECISIONS}.')
    params = [p for group in optimizer.param_groups for p in group['params']]
    device = params[0].device if params else torch.device('cpu')
    if device.type == 'cuda':
        wrapper, reason = _cuda_wrapper(optimizer, precision, kwargs)
    else:
        dtype, reason = choose_cpu_precision(precision)
        kwargs.pop('loss_scale', None)  # no loss scaling without float16
        wrapper_type = BF16AutocastOptimWrapper if dtype == torch.bfloat16 else OptimWrapper
        wrapper = wrapper_type(optimizer=optimizer, **kwargs)
    print_log(f'Mixed precision on {device.type}: {reason}.', logger='current')
    return wrapper


def gpu_has_bfloat16(device=None) -> bool:
    """Whether the GPU computes in bfloat16 natively: compute capability 8.0 (Ampere) or
    newer. ``torch.cuda.is_bf16_supported()`` also says yes where bfloat16 is only
    emulated (a T4, sm_75), where bfloat16 AMP is slower than float16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _cuda_wrapper(optimizer, precision: str, kwargs: dict) -> Tuple[OptimWrapper, str]:
    if precision == 'float32':
        kwargs.pop('loss_scale', None)
        return OptimWrapper(optimizer=optimizer, **kwargs), 'float32 (precision=float32)'
    params = [p for group in optimizer.param_groups for p in group['params']]
    bf16 = gpu_has_bfloat16(params[0].device if params else None)
    if precision == 'bfloat16' and not bf16:
        raise ValueError('MixedPrecisionOptimWrapper: precision=bfloat16, but this GPU does '
                         'not support bfloat16 (it needs compute capability 8.0 or newer); '
                         'use precision=auto (float16 there) or float32.')
    if precision == 'float16' or (precision == 'auto' and not bf16):
        dtype, reason = 'float16', 'float16 AMP with dynamic loss scaling' + (
            '' if precision == 'float16' else ' (this GPU has no bfloat16)')
    else:
        dtype, reason = 'bfloat16', 'bfloat16 AMP' + (
            ' (precision=bfloat16)' if precision == 'bfloat16' else ' (supported by this GPU)')
    kwargs.setdefault('loss_scale', 'dynamic')
    return AmpOptimWrapper(optimizer=optimizer, dtype=dtype, **kwargs), reason


def use_amp(cfg) -> None:
    """``--amp`` of ``tools/train.py``: float16 AMP with dynamic loss scaling on CUDA (as
    mmdet's own ``--amp``), and without CUDA :func:`mixed_precision_optim_wrapper` (bfloat16
    where the CPU runs it fast, else float32). Exits with a message for a wrapper type that
    cannot be switched."""
    import sys
    wrapper_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
    switchable = ('OptimWrapper', 'AmpOptimWrapper', 'BF16AutocastOptimWrapper',
                  'MixedPrecisionOptimWrapper')
    if wrapper_type not in switchable:
        sys.exit(f'--amp: the config uses the optimizer wrapper {wrapper_type!r}; only '
                 f'{", ".join(switchable)} can be switched to mixed precision.')
    if torch.cuda.is_available():
        cfg.optim_wrapper.pop('precision', None)
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    else:
        cfg.optim_wrapper.type = 'MixedPrecisionOptimWrapper'
        cfg.optim_wrapper.setdefault('precision', 'auto')
