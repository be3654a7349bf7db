"""Linear layers with their GELU or residual sum in the same oneDNN call, for inference.

A channel MLP in inference is ``residual + fc2(gelu(fc1(x)))`` on (pixels, C) matrices. In
plain PyTorch that is two matrix products (MKL) plus a pass over the hidden activations for
the GELU and one over the output for the sum. oneDNN's inner-product primitive applies the
exact GELU and the sum as post-ops of its products (``torch.ops.mkldnn._linear_pointwise``,
the kernels behind ``torch.compile``'s CPU code). Where PyTorch's kernels use AVX-512 its
products also run faster than MKL's on these shapes (one thread: 112 against 100 GFLOP/s),
and ConvMLP-S inference at 1x3x640x640 took 424 against 431 ms with them; held to AVX2 on
the same CPU the fused calls made it slower (470 against 451 ms), so there the plain ops
stay. Measured by CPU time at one thread, alternating (AMD EPYC, AVX-512 natively and held
to AVX2 by ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA`` and ``MKL_ENABLE_INSTRUCTIONS``).

:func:`fuses` says where the fused calls apply: float32 CPU tensors outside autocast (under
autocast the plain ops follow autocast's dtype), with oneDNN built in and enabled, on a CPU
where PyTorch runs AVX-512 kernels. Elsewhere :func:`linear_gelu` and :func:`linear_add` are
the plain ops, and 1x1 convolutions stay convolutions instead of :func:`linear_relu`. Results
differ from the plain ops by rounding only (about 1e-7 relative).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def fuses(x: torch.Tensor) -> bool:
    """Whether the functions here take oneDNN's fused calls for ``x``."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and torch.backends.cpu.get_cpu_capability() == 'AVX512')


def linear_gelu(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """``gelu(fc(x))`` (exact GELU) for a (N, in) matrix ``x``: (N, out)."""
    if fuses(x):
        return torch.ops.mkldnn._linear_pointwise(x, fc.weight, fc.bias, 'gelu', [], 'none')
    return F.gelu(fc(x))


def linear_add(x: torch.Tensor, fc: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``residual + fc(x)`` for a (N, in) matrix ``x`` and a (N, out) ``residual``."""
    if fuses(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, fc.weight, fc.bias,
                                                         'add')
    return fc(x).add_(residual)


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                ) -> torch.Tensor:
    """``relu(F.linear(x, weight, bias))`` over the last dimension of ``x`` in one oneDNN
    call, for an ``x`` where :func:`fuses` holds: a 1x1 convolution of a channels-last map
    (on AVX-512, 128 -> 64 channels on 1x104x160 pixels, one thread: 3.7 ms against 4.3 ms
    for PyTorch's convolution and ReLU; elsewhere the plain convolution is as fast)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'relu', [], '')
