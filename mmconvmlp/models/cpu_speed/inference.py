"""Inference on the CPU: the same maps as the plain network, computed with less memory
traffic.

:func:`accelerate_for_cpu_inference` gives a model's :class:`~..convmlp.Tokenizer`,
:class:`~..convmlp.ConvStage` and :class:`~..convmlp.ConvMLPBlock` modules the subclasses
below (parameters, buffers and their names stay). Their ``forward`` takes the fast route
where a call allows it (:func:`runs_fast`: CPU tensors, no autograd graph to record, not
being traced or compiled) and the plain ``forward`` otherwise:

* the tokenizer and the convolutional stage run a band of rows at a time
  (:mod:`.row_bands`), their BatchNorms folded into the convolutions (at each call, so
  weights loaded later count) where they use running statistics, and the max-pool before
  the last ReLU (they commute, and the ReLU then works on a quarter of the memory);
* each ConvMLP block runs its channel MLPs a band of pixels at a time together with their
  LayerNorms and residual sums, through oneDNN's fused calls where PyTorch runs AVX-512
  kernels (:mod:`.onednn`); the second sum overwrites the depthwise conv's fresh output.

The results are the plain network's, to rounding. ``docs/speed.md`` holds the measurements.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..convmlp import ChannelMLP, ConvMLPBlock, ConvStage, Tokenizer
from .onednn import linear_add, linear_gelu
from .row_bands import (ChainRows, ConvRows, MaxPoolRows, ResidualRows, RowOp, run_in_bands,
                        run_pixels_in_bands)


def runs_fast(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may take its fast route for ``x``: on the CPU, with no autograd
    graph to record, and no graph being traced or compiled (which record the plain
    computation)."""
    if x.device.type != 'cpu' or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not (
        x.requires_grad or any(p.requires_grad for p in module.parameters()))


def uses_running_stats(norm: nn.Module) -> bool:
    return (isinstance(norm, _BatchNorm) and not norm.training
            and norm.running_mean is not None)


def fold_batchnorm(weight: torch.Tensor, bias: Optional[torch.Tensor], norm: _BatchNorm):
    """Weight and bias of ``norm(conv(x))`` as one convolution, for a BatchNorm that uses
    its running statistics and a convolution of ``weight`` and ``bias``."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return weight * scale.view(-1, 1, 1, 1), shift


def row_ops(layers: Sequence[nn.Module]) -> Optional[List[RowOp]]:
    """A chain of convolutions, BatchNorms (folded into the convolution before them), ReLUs
    and max-pools as row ops, or None where a layer is none of these or a BatchNorm does not
    use running statistics. A max-pool after a ReLU runs before it."""
    ops: List[RowOp] = []
    for layer in layers:
        last = ops[-1] if ops else None
        if isinstance(layer, nn.Conv2d) and ConvRows.takes(layer):
            ops.append(ConvRows(layer, layer.weight, layer.bias, relu=False))
        elif isinstance(last, ConvRows) and not last.relu and uses_running_stats(layer):
            last.weight, last.bias = fold_batchnorm(last.weight, last.bias, layer)
        elif isinstance(layer, nn.ReLU) and last is not None and not last.relu:
            last.relu = True
        elif MaxPoolRows.takes(layer):
            relu_after = last is not None and last.relu
            if relu_after:
                last.relu = False
            ops.append(MaxPoolRows(layer, relu=relu_after))
        else:
            return None
    return ops


class BandedTokenizer(Tokenizer):
    """:class:`Tokenizer` that infers a band of rows at a time (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = row_ops(self.block) if runs_fast(self, x) else None
        if ops is None:
            return super().forward(x)
        return run_in_bands(ChainRows(ops), x)


class BandedConvStage(ConvStage):
    """:class:`ConvStage` that infers a band of rows at a time (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_fast(self, x):
            blocks = [row_ops(block) for block in self.conv_blocks]
            downsample = row_ops([self.downsample])
            if downsample is not None and all(ops is not None for ops in blocks):
                return run_in_bands(ChainRows(
                    [*(ResidualRows(ChainRows(ops)) for ops in blocks), *downsample]), x)
        return super().forward(x)


def added_to(mlp: ChannelMLP, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``residual + mlp(x)`` for (N, C) matrices, with the GELU and the sum inside the
    products' calls where :func:`.onednn.fuses` holds."""
    return linear_add(linear_gelu(x, mlp.fc1), mlp.fc2, residual)


class BandedConvMLPBlock(ConvMLPBlock):
    """:class:`ConvMLPBlock` whose channel MLPs infer a band of pixels at a time with their
    LayerNorms and residual sums (see the module). Stochastic depth takes the plain route."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not runs_fast(self, x) or self.drop_path.drops():
            return super().forward(x)
        mlp1, mlp2 = self.channel_mlp1, self.channel_mlp2
        x = run_pixels_in_bands(
            lambda band: self.connect_norm(added_to(mlp1, band, self.norm1(band))), x,
            mlp1.fc1.out_features)
        x = self.connect(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return run_pixels_in_bands(lambda band: added_to(mlp2, band, self.norm2(band)), x,
                                   mlp2.fc1.out_features, in_place=True)


#: The plain classes and their fast subclasses.
FAST_CLASSES = {Tokenizer: BandedTokenizer, ConvStage: BandedConvStage,
                ConvMLPBlock: BandedConvMLPBlock}


def accelerate_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Give the tokenizers, convolutional stages and ConvMLP blocks in ``model`` (a
    backbone, a timm model, a detector or segmentor) the fast classes of this module.
    Parameters, buffers and their names stay; calls that do not qualify (training, autograd,
    GPUs, tracing) compute as before. Returns ``model``;
    :func:`remove_cpu_inference_route` undoes it."""
    for module in model.modules():
        fast = FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


def remove_cpu_inference_route(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_for_cpu_inference`: the plain classes again."""
    plain = {fast: cls for cls, fast in FAST_CLASSES.items()}
    for module in model.modules():
        cls = plain.get(type(module))
        if cls is not None:
            module.__class__ = cls
    return model
