"""Linear layers with their GELU, ReLU or residual sum in the same oneDNN call.

A channel MLP in inference is ``residual + fc2(gelu(fc1(x)))`` on (pixels, C) matrices. In
plain PyTorch that is two matrix products (MKL) plus a pass over the hidden activations for
the GELU and one over the output for the sum. oneDNN's inner-product primitive applies the
exact GELU and the sum as post-ops of its products (``torch.ops.mkldnn._linear_pointwise``,
the kernels behind ``torch.compile``'s CPU code).

:func:`fuses` says where the fused calls apply: float32 CPU tensors outside autocast (under
autocast the plain ops follow autocast's dtype), with oneDNN built in and enabled, on a CPU
where PyTorch runs AVX-512 kernels; held to AVX2 they were slower than the plain ops
(``docs/speed.md``). Elsewhere :func:`linear_gelu` and :func:`linear_add` are the plain ops.
Results differ from the plain ops by rounding only (about 1e-7 relative).
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
    (faster than PyTorch's convolution and ReLU on AVX-512, as fast elsewhere)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'relu', [], '')
