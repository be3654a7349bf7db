"""The convolutional front end in horizontal bands of rows, and the channel MLPs in bands of
pixels, for inference (:mod:`.inference` decides where).

In inference the tokenizer and the convolutional stage are chains of convolutions (with
their BatchNorms folded in), ReLUs, a max-pool and residual sums: each output row depends on
a few neighbouring input rows only. Computed a band of rows at a time, their large
intermediate maps (for a 1x3x800x1216 image, three of 31-62 MB) never exist whole: each band's
intermediates are a few MB, stay in the CPU caches and come from memory the allocator already
holds, instead of fresh pages that the operating system must fault in one by one. The channel
MLPs, functions of each pixel alone, go a band of pixels at a time for the same reason
(:func:`run_pixels_in_bands`). The results are those of the whole-map computation.

A :class:`RowOp` maps a (B, C, H, W) band to a band; :func:`run_in_bands` drives a chain of
them over a map. Every op here has a square window with the same ``size``/``stride``/``pad``
across and down. Where a band meets the top or bottom edge of the map, the op's own padding
(zeros, or -inf for max-pooling) stands in for the rows outside it (:meth:`RowOp.rows`), so
no band is copied to be padded.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .onednn import fuses, linear_relu

#: Bytes of output a band of rows aims at (its intermediates are then a few times that), and
#: bytes of the widest intermediate a band of pixels aims at.
BAND_BYTES = 2 << 20


class RowOp:
    """A map from (B, C, H, W) to (B, C', H', W') whose output rows ``[lo, hi)`` depend on
    input rows ``[lo * stride - pad, (hi - 1) * stride - pad + size)`` only. Rows outside the
    input read as the op's padding (``fill``); ``max_pad`` is the most padding it takes."""

    size, stride, pad, fill, max_pad = 1, 1, 0, 0., float('inf')

    def out_size(self, n: int) -> int:
        return (n + 2 * self.pad - self.size) // self.stride + 1

    def out_channels(self, channels: int) -> int:
        return channels

    def input_rows(self, lo: int, hi: int) -> Tuple[int, int]:
        return lo * self.stride - self.pad, (hi - 1) * self.stride - self.pad + self.size

    def rows(self, band: torch.Tensor, first: int, height: int, lo: int, hi: int
             ) -> torch.Tensor:
        """Output rows ``[lo, hi)``, from a ``band`` that holds rows ``[first, first +
        band rows)`` of an input map ``height`` rows high, including those rows of
        :meth:`input_rows` that lie inside the map.

        Inside the map the op runs without padding along the height. Where the rows reach
        past the top or bottom edge it runs with its own padding on both sides instead of on
        a padded copy: as much as puts an output row's window on ``lo``'s (the output rows
        before it, ``skip``, and after ``hi`` are dropped). Only where that is more than the
        op takes (max-pooling at the bottom edge) does it pad a copy."""
        top, bottom = self.input_rows(lo, hi)
        x = band[:, :, max(top, 0) - first:min(bottom, height) - first]
        if top >= 0 and bottom <= height:
            return self.apply(x, 0)
        skip = lo if top < 0 else -(-self.pad // self.stride)
        row_pad = self.pad if top < 0 else skip * self.stride
        if row_pad > self.max_pad:
            return self.apply(F.pad(x, (0, 0, 0, bottom - height), value=self.fill), 0)
        return self.apply(x, row_pad)[:, :, skip:skip + hi - lo]

    def apply(self, x: torch.Tensor, row_pad: int) -> torch.Tensor:
        """The op on the rows ``x``, with ``row_pad`` rows of padding above and below (and its
        own padding across)."""
        raise NotImplementedError


class ConvRows(RowOp):
    """``conv`` with the given weight and bias (a BatchNorm folded in), then ReLU if asked."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 relu: bool):
        assert self.takes(conv)
        self.size, self.stride, self.pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.groups, self.weight, self.bias, self.relu = conv.groups, weight, bias, relu

    @staticmethod
    def takes(conv: nn.Module) -> bool:
        """Whether ``conv`` is a convolution of the square geometry this op runs."""
        return (isinstance(conv, nn.Conv2d) and conv.padding_mode == 'zeros'
                and isinstance(conv.padding, tuple)
                and conv.kernel_size[0] == conv.kernel_size[1]
                and conv.stride[0] == conv.stride[1] and conv.padding[0] == conv.padding[1]
                and conv.dilation == (1, 1))

    def out_channels(self, channels: int) -> int:
        return self.weight.shape[0]

    def apply(self, x: torch.Tensor, row_pad: int) -> torch.Tensor:
        if self.relu and self.size == 1 and self.stride == 1 and self.groups == 1 \
                and fuses(x):  # a matrix product per pixel, with the ReLU in its call
            return linear_relu(x.permute(0, 2, 3, 1), self.weight.flatten(1),
                               self.bias).permute(0, 3, 1, 2)
        x = F.conv2d(x, self.weight, self.bias, self.stride, (row_pad, self.pad), 1,
                     self.groups)
        return x.relu_() if self.relu else x


class MaxPoolRows(RowOp):
    """``pool`` (padding reads as -inf), then ReLU if asked."""

    fill = float('-inf')

    def __init__(self, pool: nn.MaxPool2d, relu: bool):
        assert self.takes(pool)
        self.size, self.stride, self.pad = pool.kernel_size, pool.stride, pool.padding
        self.max_pad = pool.kernel_size // 2
        self.relu = relu

    @staticmethod
    def takes(pool: nn.Module) -> bool:
        """Whether ``pool`` is a max-pooling of the square geometry this op runs."""
        return (isinstance(pool, nn.MaxPool2d) and all(
            isinstance(v, int) for v in (pool.kernel_size, pool.stride, pool.padding))
            and pool.dilation == 1 and not pool.ceil_mode and not pool.return_indices)

    def apply(self, x: torch.Tensor, row_pad: int) -> torch.Tensor:
        x = F.max_pool2d(x, self.size, self.stride, (row_pad, self.pad))
        return x.relu_() if self.relu else x


class ChainRows(RowOp):
    """The ops one after the other."""

    def __init__(self, ops: Sequence[RowOp]):
        self.ops = list(ops)

    def out_size(self, n: int) -> int:
        for op in self.ops:
            n = op.out_size(n)
        return n

    def out_channels(self, channels: int) -> int:
        for op in self.ops:
            channels = op.out_channels(channels)
        return channels

    def input_rows(self, lo: int, hi: int) -> Tuple[int, int]:
        for op in reversed(self.ops):
            lo, hi = op.input_rows(lo, hi)
        return lo, hi

    def rows(self, band: torch.Tensor, first: int, height: int, lo: int, hi: int
             ) -> torch.Tensor:
        heights = [height]
        for op in self.ops[:-1]:
            heights.append(op.out_size(heights[-1]))
        # The rows each op must make, inside its output map, last op first.
        spans: List[Tuple[int, int]] = [(lo, hi)]
        for op, op_height in zip(self.ops[:0:-1], heights[:0:-1]):
            top, bottom = op.input_rows(*spans[0])
            spans.insert(0, (max(top, 0), min(bottom, op_height)))
        x = band
        for op, op_height, (op_lo, op_hi) in zip(self.ops, heights, spans):
            x, first = op.rows(x, first, op_height, op_lo, op_hi), op_lo
        return x


class ResidualRows(RowOp):
    """``x + branch(x)`` for a branch that keeps the map's size."""

    def __init__(self, branch: RowOp):
        self.branch = branch

    def input_rows(self, lo: int, hi: int) -> Tuple[int, int]:
        top, bottom = self.branch.input_rows(lo, hi)
        return min(top, lo), max(bottom, hi)

    def rows(self, band: torch.Tensor, first: int, height: int, lo: int, hi: int
             ) -> torch.Tensor:
        out = self.branch.rows(band, first, height, lo, hi)
        return out.add_(band[:, :, lo - first:hi - first])


def run_in_bands(op: RowOp, x: torch.Tensor) -> torch.Tensor:
    """``op`` applied to the channels-last-memory (B, C, H, W) map ``x``, computed in bands
    of output rows of about :data:`BAND_BYTES` each; returns a channels-last-memory map."""
    batch, channels, height, width = x.shape
    out_height, out_width = op.out_size(height), op.out_size(width)
    out_channels = op.out_channels(channels)
    row_bytes = batch * out_channels * out_width * x.element_size()
    step = max(1, BAND_BYTES // max(row_bytes, 1))
    first = op.rows(x, 0, height, 0, min(step, out_height))
    if step >= out_height:
        return first.contiguous(memory_format=torch.channels_last)
    # The first band sets the dtype: under autocast it is not the input's.
    out = torch.empty((batch, out_channels, out_height, out_width), dtype=first.dtype,
                      device=x.device, memory_format=torch.channels_last)
    out[:, :, :step] = first
    for lo in range(step, out_height, step):
        out[:, :, lo:lo + step] = op.rows(x, 0, height, lo, min(lo + step, out_height))
    return out


def run_pixels_in_bands(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        inner_channels: int, in_place: bool = False) -> torch.Tensor:
    """``fn(x)`` for a ``fn`` of each pixel's channels (a channel MLP) and a (..., C) tensor
    ``x``, computed a band of pixels at a time; ``inner_channels`` is the width of ``fn``'s
    widest intermediate, which a band keeps to about :data:`BAND_BYTES`. With ``in_place``
    (for a ``fn`` that keeps the width and an ``x`` that nothing else reads) each band's
    result overwrites its own pixels of ``x`` instead of going to fresh memory."""
    pixels = x.reshape(-1, x.shape[-1])
    step = max(1, BAND_BYTES // (inner_channels * x.element_size()))
    out = pixels if in_place else None
    for lo in range(0, max(len(pixels), 1), step):  # one empty band for an empty batch
        band = fn(pixels[lo:lo + step])
        if out is None:
            if step >= len(pixels):
                return band.view(*x.shape[:-1], band.shape[-1])
            out = band.new_empty(len(pixels), band.shape[-1])
        out[lo:lo + step] = band
    return out.view(*x.shape[:-1], out.shape[-1])
