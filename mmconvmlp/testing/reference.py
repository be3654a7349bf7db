"""A plain, layout-naive ConvMLP written straight from the spec, in the authors' layout:
channels-first convolutions, a permute to channels-last before the MLP stages, and a permute
to channels-first and back around every depthwise and downsampling convolution.

It is the yardstick of the optimised :class:`mmconvmlp.models.ConvMLPFeatures`: the same
parameter names (weights copy over with ``load_state_dict``), the same four taps. The tests
check that both agree; ``tools/benchmark_backbone.py`` times one against the other.
"""
from typing import List

import torch
import torch.nn as nn
from timm.layers import DropPath

from ..models.convmlp import per_stage_drop_path_rates, resolve_arch


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class _Tokenizer(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(*_conv_bn_relu(3, c // 2, 3, 2), *_conv_bn_relu(c // 2, c // 2, 3),
                                   *_conv_bn_relu(c // 2, c, 3), nn.MaxPool2d(3, 2, 1))


class _ConvStage(nn.Module):
    def __init__(self, n: int, c: int, d: int):
        super().__init__()
        self.conv_blocks = nn.ModuleList(
            nn.Sequential(*_conv_bn_relu(c, d, 1), *_conv_bn_relu(d, d, 3), *_conv_bn_relu(d, c, 1))
            for _ in range(n))
        self.downsample = nn.Conv2d(c, d, 3, 2, 1)


class _MLP(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, d: int, h: int, drop_path: float):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.norm1, self.channel_mlp1 = nn.LayerNorm(d), _MLP(d, h)
        self.connect_norm = nn.LayerNorm(d)
        self.connect = nn.Conv2d(d, d, 3, 1, 1, groups=d, bias=False)
        self.norm2, self.channel_mlp2 = nn.LayerNorm(d), _MLP(d, h)

    def forward(self, x):  # (B, H, W, C)
        x = x + self.drop_path(self.channel_mlp1(self.norm1(x)))
        x = self.connect(self.connect_norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.channel_mlp2(self.norm2(x)))


class _Downsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.downsample = nn.Conv2d(cin, cout, 3, 2, 1)

    def forward(self, x):  # (B, H, W, C)
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _Stage(nn.Module):
    def __init__(self, d: int, h: int, d_next: int, rates):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d, h, r) for r in rates)
        if d_next:
            self.downsample_mlp = _Downsample(d, d_next)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample_mlp(x) if hasattr(self, 'downsample_mlp') else x


class ReferenceConvMLP(nn.Module):
    """(B, 3, H, W) -> the four taps of the spec, as contiguous (B, C, H, W) tensors."""

    def __init__(self, arch='s', drop_path_rate=0.1):
        super().__init__()
        a = resolve_arch(arch)
        w = a['widths']
        self.tokenizer = _Tokenizer(a['stem_width'])
        self.conv_stages = _ConvStage(a['conv_blocks'], a['stem_width'], w[0])
        rates = per_stage_drop_path_rates(a['blocks'], drop_path_rate)
        self.stages = nn.ModuleList(
            _Stage(w[i], int(w[i] * a['mlp_ratios'][i]), w[i + 1] if i < 2 else 0,
                   rates[i])
            for i in range(3))

    def forward(self, x):
        t0 = self.tokenizer.block(x)
        x = t0
        for block in self.conv_stages.conv_blocks:
            x = x + block(x)
        t1 = self.conv_stages.downsample(x)
        x = self.stages[0](t1.permute(0, 2, 3, 1))
        t2 = x.permute(0, 3, 1, 2)
        x = self.stages[2](self.stages[1](x))
        t3 = x.permute(0, 3, 1, 2)
        return tuple(t.contiguous() for t in (t0, t1, t2, t3))
