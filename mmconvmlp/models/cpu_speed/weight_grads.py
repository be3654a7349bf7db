"""Training on the CPU: convolutions whose weight gradient is computed in channels-first
memory where this CPU is faster so.

The network keeps its maps in channels-last memory, where oneDNN's forward and input-gradient
kernels run fastest on AVX2 and AVX-512 CPUs alike. Its AVX2 kernel for the *weight* gradient
of a channels-last convolution is the exception: on large maps it runs 1.5-4x slower than
the kernel for oneDNN's blocked layouts, which a channels-first call reaches after a cheap
reorder; on AVX-512 the channels-last kernel is as fast or faster (``docs/speed.md``).

:func:`accelerate_for_cpu_training` gives the dense convolutions of a model's ConvMLP
networks the class :class:`ChannelsFirstWeightGradConv2d` (same parameters and names), whose
weight gradient comes from channels-first copies of the input and the output gradient where
:func:`takes_channels_first_weight_grad` says so: float32 on the CPU, a large map, and a CPU
whose channels-last weight gradients are slow. Rather than guessing from CPU flags,
:func:`channels_last_weight_grad_is_slow` times one such weight gradient both ways, once per
process. :func:`set_weight_grad_layout` forces either route (the tests simulate both kinds
of CPU with it). Elsewhere the convolution is ``nn.Conv2d``'s own.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ...machine import best_thread_time

WEIGHT_GRAD_LAYOUTS = ('auto', 'channels_last', 'channels_first')
#: How many times faster the channels-first route must measure in the probe to be taken.
#: It lies between what the probe measures held to AVX2 and natively on AVX-512
#: (``docs/speed.md``).
MARGIN = 1.3
#: Where the channels-first route pays on a CPU that takes it: maps of at least
#: ``MIN_PIXELS`` pixels per image, and ``in_channels * out_channels * pixels`` of at least
#: ``MIN_WORK``. Below, the copies cost about what the faster kernel saves.
MIN_PIXELS = 64 * 64
MIN_WORK = 2 ** 26

_forced: Optional[str] = None


def set_weight_grad_layout(layout: str = 'auto') -> None:
    """Compute the weight gradients of the convolutions in ``'channels_last'`` or
    ``'channels_first'`` memory from now on (the latter on large maps only), or as measured
    (``'auto'``, the default)."""
    global _forced
    if layout not in WEIGHT_GRAD_LAYOUTS:
        raise ValueError(f'Unknown weight-gradient layout {layout!r}: give one of '
                         f'{WEIGHT_GRAD_LAYOUTS}.')
    _forced = None if layout == 'auto' else layout


def weight_grad_layout() -> str:
    """``'channels_first'`` or ``'channels_last'``: forced, or measured on this CPU."""
    if _forced is not None:
        return _forced
    return 'channels_first' if channels_last_weight_grad_is_slow() else 'channels_last'


@functools.lru_cache(maxsize=None)
def channels_last_weight_grad_is_slow() -> bool:
    """Whether the channels-last weight gradient of :func:`weight_grad_probe` takes
    :data:`MARGIN` times longer on this CPU than the channels-first route. Measured once per
    process."""
    channels_last, channels_first = weight_grad_probe()
    return channels_last > MARGIN * channels_first


def weight_grad_probe() -> Tuple[float, float]:
    """CPU seconds of the weight gradient of a 3x3 convolution, 128 -> 128 channels on a
    1x128x128x128 map (as in the convolutional stage of a 512x512 image), in channels-last
    memory and by the channels-first route (copies included); best of two runs after one
    untimed run, on one thread (under a second in all)."""
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(1, 128, 128, 128, generator=gen).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    weight = torch.randn(128, 128, 3, 3, generator=gen).contiguous(
        memory_format=torch.channels_last)

    with torch.no_grad():
        return tuple(
            best_thread_time(functools.partial(route, grad, x, weight, (1, 1), (1, 1)), 2)
            for route in (_weight_grad, _channels_first_weight_grad))


def _channels_first_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                stride: Tuple[int, int], padding: Tuple[int, int]
                                ) -> torch.Tensor:
    """The weight gradient of channels-last ``grad`` and ``x``, from channels-first copies."""
    return _weight_grad(transpose_images(grad, to_channels_last=False),
                        transpose_images(x, to_channels_last=False), weight.contiguous(),
                        stride, padding)


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, (1, 1), False, (0, 0), 1,
        (False, True, False))[1]


def takes_channels_first_weight_grad(conv: nn.Conv2d, x: torch.Tensor,
                                     weight: torch.Tensor) -> bool:
    """Whether :class:`ChannelsFirstWeightGradConv2d` computes this convolution's weight gradient in channels-first
    memory: a float32 channels-last map on the CPU, outside autocast and graph capture, whose
    weight needs a gradient; a dense convolution with a kernel larger than 1x1 on a map
    large enough (:data:`MIN_PIXELS`, :data:`MIN_WORK`); and a CPU whose channels-last
    weight gradients are slow (or where that route is forced)."""
    pixels = x.shape[2] * x.shape[3]
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and weight.requires_grad
            and torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu')
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.kernel_size != (1, 1)
            and pixels >= MIN_PIXELS and x.shape[1] * weight.shape[0] * pixels >= MIN_WORK
            and x.is_contiguous(memory_format=torch.channels_last)
            and weight_grad_layout() == 'channels_first')


class ChannelsFirstWeightGradConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient is computed in channels-first memory where
    :func:`takes_channels_first_weight_grad` says so. Same values either way, to rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_channels_first_weight_grad(self, x, self.weight):
            return _ChannelsFirstWeightGrad.apply(x, self.weight, self.bias, self.stride,
                                                  self.padding)
        return super().forward(x)


def accelerate_for_cpu_training(model: nn.Module) -> nn.Module:
    """Give the dense convolutions with kernels larger than 1x1 of every ConvMLP network in
    ``model`` (any module holding one: a backbone, a timm model, a detector) the class
    :class:`ChannelsFirstWeightGradConv2d`. Parameters, buffers and their names stay.
    Returns ``model``; :func:`remove_cpu_training_route` undoes it."""
    from ..convmlp import ConvMLPFeatures
    for network in model.modules():
        if not isinstance(network, ConvMLPFeatures):
            continue
        for conv in network.modules():
            if type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1) \
                    and conv.kernel_size != (1, 1) and conv.padding_mode == 'zeros' \
                    and isinstance(conv.padding, tuple):
                conv.__class__ = ChannelsFirstWeightGradConv2d
    return model


def remove_cpu_training_route(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_for_cpu_training`: plain ``nn.Conv2d`` again."""
    for conv in model.modules():
        if type(conv) is ChannelsFirstWeightGradConv2d:
            conv.__class__ = nn.Conv2d
    return model


class _ChannelsFirstWeightGrad(torch.autograd.Function):
    """A dense convolution; its backward pass computes the input gradient from the
    channels-last tensors, the weight gradient from channels-first copies, and the bias
    gradient as a sum (asked for with the input gradient, oneDNN would compute the weight
    gradient too, in the slow kernel)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, (1, 1), False, (0, 0), 1,
                (True, False, False))[0]
        if need_bias:
            grad_bias = grad.sum((0, 2, 3))
        if need_weight:
            grad_weight = _channels_first_weight_grad(grad, x, weight, stride, padding)
        return grad_input, grad_weight, grad_bias, None, None


def transpose_images(x: torch.Tensor, to_channels_last: bool) -> torch.Tensor:
    """(B, C, H, W) from channels-last to contiguous memory or back, per image as a 2-D
    transpose of the (C, H*W) and (H*W, C) matrices, which PyTorch's CPU copy does in
    cache-sized tiles: 2-3x faster than the general strided copy behind ``contiguous()``."""
    b, c, h, w = x.shape
    if to_channels_last:
        out = torch.empty_like(x, memory_format=torch.channels_last)
        src, dst = x.reshape(b, c, h * w), out.permute(0, 2, 3, 1).reshape(b, h * w, c)
    else:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        src, dst = x.permute(0, 2, 3, 1).reshape(b, h * w, c), out.view(b, c, h * w)
    for image in range(b):
        dst[image].copy_(src[image].t())
    return out
