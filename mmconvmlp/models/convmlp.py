"""ConvMLP (Li et al., 2021) in plain PyTorch: the one implementation behind both the
OpenMMLab backbone (:class:`mmconvmlp.models.ConvMLP`) and the timm models.

Layout of the network and of its four feature taps (strides 4, 8, 16, 32)::

    image (B, 3, H, W)
      tokenizer        3x [3x3 conv, BN, ReLU], 3x3 max-pool      -> tap 0, stride 4,  C
      conv_stages      residual bottlenecks, 3x3 s2 conv          -> tap 1, stride 8,  D0
      stages[0]        ConvMLP blocks at D0, 3x3 s2 conv -> D1    -> tap 2, stride 16, D1
      stages[1]        ConvMLP blocks at D1, 3x3 s2 conv -> D2       (not tapped)
      stages[2]        ConvMLP blocks at D2                       -> tap 3, stride 32, D2

The convolutional front end runs in ``torch.channels_last`` memory format (in inference on
the CPU a band of rows at a time, see :mod:`.row_bands`), and the MLP
stages work on channels-last ``(B, H, W, C)`` tensors end to end: a ``(B, C, H, W)`` view of
such a tensor *is* channels-last memory, so the depthwise and downsampling convolutions take
it without a copy and hand back memory that is again contiguous ``(B, H, W, C)``. In inference
on the CPU each channel MLP runs a band of pixels at a time with its LayerNorm and residual
sum, through oneDNN's fused calls where PyTorch runs AVX-512 kernels (:mod:`.fused_linear`).
In training on CPUs whose channels-last weight-gradient kernels are slow (AVX2), the weight
gradients of the large convolutions are computed from channels-first copies
(:mod:`.layouts`).

Module and parameter names follow the authors' released ImageNet checkpoints, which therefore
load as they are.
"""
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .fused_linear import linear_add, linear_gelu
from .layouts import conv2d, transpose_images
from .row_bands import (ChainRows, ConvRows, MaxPoolRows, ResidualRows, RowOp, run_in_bands,
                        run_pixels_in_bands)

NormLayer = Callable[[int], nn.Module]

#: The paper's three models. ``blocks``/``widths``/``mlp_ratios`` describe the three MLP
#: stages, ``stem_width`` the tokenizer output and ``conv_blocks`` the convolutional stage.
ARCH_SETTINGS: Dict[str, Dict] = {
    's': dict(blocks=(2, 4, 2), widths=(128, 256, 512), mlp_ratios=(2, 2, 2),
              stem_width=64, conv_blocks=2),
    'm': dict(blocks=(3, 6, 3), widths=(128, 256, 512), mlp_ratios=(3, 3, 3),
              stem_width=64, conv_blocks=3),
    'l': dict(blocks=(4, 8, 3), widths=(192, 384, 768), mlp_ratios=(3, 3, 3),
              stem_width=96, conv_blocks=3),
}
ARCH_KEYS = ('blocks', 'widths', 'mlp_ratios', 'stem_width', 'conv_blocks')
NUM_TAPS = 4
#: The parts that ``frozen_stages`` counts: 0 tokenizer, 1 conv stage, 2-4 MLP stages.
NUM_PARTS = 5


def resolve_arch(arch: Union[str, Mapping]) -> Dict:
    """Return the settings of ``arch``: a name in :data:`ARCH_SETTINGS` or a dict with
    exactly the keys of :data:`ARCH_KEYS`. Raises ``ValueError`` naming what is valid."""
    if isinstance(arch, str):
        settings = ARCH_SETTINGS.get(arch.lower())
        if settings is None:
            raise ValueError(
                f'Unknown ConvMLP arch {arch!r}: use one of {sorted(ARCH_SETTINGS)} or a dict '
                f'with the keys {list(ARCH_KEYS)}.')
        return dict(settings)
    if not isinstance(arch, Mapping):
        raise TypeError(f'ConvMLP arch must be a str or a dict, not {type(arch).__name__}.')
    missing = [k for k in ARCH_KEYS if k not in arch]
    unknown = [k for k in arch if k not in ARCH_KEYS]
    if missing or unknown:
        raise ValueError(f'Custom ConvMLP arch {dict(arch)}: missing keys {missing}, unknown '
                         f'keys {unknown}; it needs exactly {list(ARCH_KEYS)}.')
    for key in ('blocks', 'widths', 'mlp_ratios'):
        if not isinstance(arch[key], (list, tuple)) or len(arch[key]) != 3:
            raise ValueError(f'Custom ConvMLP arch: {key!r} needs one value per MLP stage '
                             f'(3 values), got {arch[key]!r}.')
    settings = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in arch.items()}
    check_arch_values(settings)
    return settings


def check_arch_values(settings: Mapping) -> None:
    """Raise ``ValueError`` naming the valid range where a custom arch holds a count or
    width below 1, a non-positive MLP ratio, or a ratio that leaves a hidden width of 0."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    problems = [f'{key}={settings[key]!r} (give integers >= {low})'
                for key, low in (('blocks', 1), ('widths', 1)) if not all(
                    is_int(v) and v >= low for v in settings[key])]
    problems += [f'{key}={settings[key]!r} (give an integer >= {low})'
                 for key, low in (('stem_width', 2), ('conv_blocks', 1))
                 if not (is_int(settings[key]) and settings[key] >= low)]
    ratios = settings['mlp_ratios']
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0
               for r in ratios):
        problems.append(f'mlp_ratios={ratios!r} (give numbers > 0)')
    elif not problems and any(int(w * r) < 1 for w, r in zip(settings['widths'], ratios)):
        problems.append(f'mlp_ratios={ratios!r} with widths={settings["widths"]!r} (each '
                        f'hidden width int(width * ratio) must be >= 1)')
    if problems:
        raise ValueError(f'Custom ConvMLP arch: invalid {"; ".join(problems)}.')


def check_drop_path_rate(drop_path_rate: float) -> None:
    """Raise ``ValueError`` unless ``drop_path_rate`` is a number in [0, 1): at 1 every
    branch would be dropped and the kept ones scaled by 1 / 0."""
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) \
            or not 0 <= drop_path_rate < 1:
        raise ValueError(f'ConvMLP drop_path_rate={drop_path_rate!r} is invalid: give a '
                         f'stochastic-depth rate in [0, 1), e.g. 0.1 (the authors\' value).')


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, stride: int,
                 norm_layer: NormLayer) -> List[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
            norm_layer(out_ch), nn.ReLU(inplace=True)]


class ConvNormReLUStack(nn.Sequential):
    """``[conv, norm, ReLU] * n``, optionally followed by a max-pool, as a flat
    ``nn.Sequential`` (so parameter names are ``{0,3,6}.weight`` for the convs, ``{1,4,7}.*``
    for the norms). The max-pool runs before the last ReLU: the two commute, and the ReLU
    then works on a quarter of the memory.

    Takes and returns channels-last-memory (B, C, H, W). Where a BatchNorm uses its running
    statistics (eval mode, ``norm_eval``, frozen stages) it is folded into the convolution's
    weights instead of making its own pass over the activations; gradients still reach all
    parameters."""

    def triples(self) -> List[Tuple[nn.Conv2d, nn.Module, nn.Module]]:
        return [tuple(self[i:i + 3]) for i in range(0, len(self) - 2, 3)]

    def pool(self) -> Optional[nn.MaxPool2d]:
        return self[-1] if len(self) % 3 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        triples, pool = self.triples(), self.pool()
        for i, (conv, norm, act) in enumerate(triples):
            if uses_running_stats(norm):
                x = conv_with(conv, x, *fold_batchnorm(conv, norm))
            else:
                x = norm(conv_with(conv, x, conv.weight, conv.bias))
            if pool is not None and i == len(triples) - 1:
                x = pool(x)
            x = act(x)
        return x

    def row_op(self) -> Optional[ChainRows]:
        """The stack as a :class:`ChainRows` with the BatchNorms folded in, or None where a
        norm does not use running statistics."""
        triples, pool = self.triples(), self.pool()
        if not all(uses_running_stats(norm) for _, norm, _ in triples):
            return None
        # As in forward: the pool, if any, comes before the last ReLU.
        last = len(triples) - 1
        ops: List[RowOp] = [ConvRows(conv, *fold_batchnorm(conv, norm),
                                     relu=pool is None or i < last)
                            for i, (conv, norm, _) in enumerate(triples)]
        if pool is not None:
            ops.append(MaxPoolRows(pool, relu=True))
        return ChainRows(ops)


def uses_running_stats(norm: nn.Module) -> bool:
    return (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.running_mean is not None)


def fold_batchnorm(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution, for a BatchNorm in eval mode."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return conv.weight * scale.view(-1, 1, 1, 1), shift


def conv_with(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv``'s geometry with the given weight and bias (for a channels-last-memory map:
    see :func:`.layouts.conv2d`)."""
    return conv2d(conv, x, weight, bias)


class Tokenizer(nn.Module):
    """(B, 3, H, W) -> (B, C, H/4, W/4): three 3x3 conv-BN-ReLU (the first with stride 2),
    then a 3x3 stride-2 max-pool. Runs in bands of rows where it may
    (:func:`may_run_in_bands`)."""

    def __init__(self, stem_width: int, norm_layer: NormLayer, in_chans: int = 3):
        super().__init__()
        half = stem_width // 2
        self.block = ConvNormReLUStack(
            *conv_bn_relu(in_chans, half, 3, 2, norm_layer),
            *conv_bn_relu(half, half, 3, 1, norm_layer),
            *conv_bn_relu(half, stem_width, 3, 1, norm_layer),
            nn.MaxPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self.block.row_op() if may_run_in_bands(self, x) else None
        return self.block(x) if op is None else run_in_bands(op, x)


class ConvStage(nn.Module):
    """(B, C, H, W) -> (B, D0, H/2, W/2): residual bottlenecks x + f(x) at width C with
    f = 1x1 C->D0, 3x3 D0->D0, 1x1 D0->C (each conv-BN-ReLU), then a 3x3 stride-2 conv.
    Runs in bands of rows where it may (:func:`may_run_in_bands`)."""

    def __init__(self, num_blocks: int, width: int, hidden: int, out_width: int,
                 norm_layer: NormLayer, with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.conv_blocks = nn.ModuleList(
            ConvNormReLUStack(*conv_bn_relu(width, hidden, 1, 1, norm_layer),
                              *conv_bn_relu(hidden, hidden, 3, 1, norm_layer),
                              *conv_bn_relu(hidden, width, 1, 1, norm_layer))
            for _ in range(num_blocks))
        self.downsample = nn.Conv2d(width, out_width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self.row_op() if may_run_in_bands(self, x) else None
        if op is not None:
            return run_in_bands(op, x)
        for block in self.conv_blocks:
            x = add_residual(x, run_block(block, x, self.with_cp and self.training))
        return conv_with(self.downsample, x, self.downsample.weight, self.downsample.bias)

    def row_op(self) -> Optional[ChainRows]:
        blocks = [block.row_op() for block in self.conv_blocks]
        if any(block is None for block in blocks):
            return None
        downsample = self.downsample
        return ChainRows([*map(ResidualRows, blocks),
                          ConvRows(downsample, downsample.weight, downsample.bias, relu=False)])


class ChannelMLP(nn.Module):
    """(..., C) -> (..., C): Linear C->hidden, exact GELU, Linear hidden->C. Without a graph
    to record on the CPU a band of pixels at a time (:func:`may_run_in_bands`), so that the
    hidden activations stay in the caches instead of taking fresh memory of (pixels, hidden);
    in inference its block calls :meth:`added_to` on such bands instead."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if may_run_in_bands(self, x):
            return run_pixels_in_bands(self.mlp, x, self.fc1.out_features)
        return self.mlp(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def added_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + mlp(x)`` for (N, C) matrices, with the GELU and the sum inside the
        products' calls (:mod:`.fused_linear`); for inference."""
        return linear_add(linear_gelu(x, self.fc1), self.fc2, residual)


class ConvMLPBlock(nn.Module):
    """(B, H, W, C) -> (B, H, W, C): channel MLP, 3x3 depthwise conv, channel MLP, each
    behind its own LayerNorm; the two MLPs are residual, the depthwise conv is not."""

    def __init__(self, width: int, hidden: int, drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.channel_mlp1 = ChannelMLP(width, hidden)
        self.connect_norm = nn.LayerNorm(width)
        self.connect = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.norm2 = nn.LayerNorm(width)
        self.channel_mlp2 = ChannelMLP(width, hidden)
        self.drop_path = ResidualDropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if may_run_in_bands(self, x) and not self.drop_path.drops():
            return self.infer_in_bands(x)
        x = self.drop_path(x, self.channel_mlp1(self.norm1(x)))
        x = channels_last_conv(self.connect, self.connect_norm(x))
        return self.drop_path(x, self.channel_mlp2(self.norm2(x)))

    def infer_in_bands(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without stochastic depth, each channel MLP a band of pixels at a
        time together with its LayerNorm and residual sum (the first also with the
        depthwise conv's LayerNorm), so that of these only the sums reach memory; the
        second MLP's sum overwrites the depthwise conv's fresh output."""
        mlp1, mlp2 = self.channel_mlp1, self.channel_mlp2
        hidden = mlp1.fc1.out_features
        x = run_pixels_in_bands(
            lambda band: self.connect_norm(mlp1.added_to(band, self.norm1(band))), x, hidden)
        x = channels_last_conv(self.connect, x)
        return run_pixels_in_bands(lambda band: mlp2.added_to(band, self.norm2(band)), x,
                                   mlp2.fc1.out_features, in_place=True)


class ResidualDropPath(nn.Module):
    """``x + branch`` with stochastic depth: in training, each sample's branch is dropped
    with probability ``drop_prob`` and scaled by ``1 / (1 - drop_prob)`` where kept, in one
    pass over the memory. Both (B, ...) tensors of one shape."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def drops(self) -> bool:
        """Whether :meth:`forward` may drop branches (training with a rate above 0)."""
        return self.training and self.drop_prob > 0.

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if not self.drops():
            return add_residual(x, branch)
        keep_prob = 1. - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        scale = x.new_empty(mask_shape).bernoulli_(keep_prob).div_(keep_prob)
        return torch.addcmul(x, branch, scale)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class ConvDownsample(nn.Module):
    """(B, H, W, Cin) -> (B, ceil(H/2), ceil(W/2), Cout) with a 3x3 stride-2 conv."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.downsample = nn.Conv2d(in_width, out_width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last_conv(self.downsample, x)


class ConvMLPStage(nn.Module):
    """(B, H, W, D) -> (B, H, W, D), or (B, H/2, W/2, D_next) when it downsamples.
    One block per entry of ``drop_path_rates``."""

    def __init__(self, width: int, hidden: int, drop_path_rates: Sequence[float],
                 out_width: int = 0, with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.blocks = nn.ModuleList(
            ConvMLPBlock(width, hidden, rate) for rate in drop_path_rates)
        self.downsample_mlp = ConvDownsample(width, out_width) if out_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_cp = self.with_cp and self.training
        for block in self.blocks:
            x = run_block(block, x, use_cp)
        if self.downsample_mlp is not None:
            x = self.downsample_mlp(x)
        return x


def may_run_in_bands(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may compute ``x`` in bands of rows or pixels (see
    :mod:`.row_bands`): on the CPU, with no autograd graph to record and no graph being
    traced or compiled, and (checked by the callers' ``row_op``) every BatchNorm using its
    running statistics. On a GPU the caching allocator already reuses memory, and many small
    kernels would be slower."""
    if x.device.type != 'cpu' or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not (
        x.requires_grad or any(p.requires_grad for p in module.parameters()))


def add_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``. Without autograd history to keep (inference, frozen parts) the sum
    goes into the freshly computed ``branch`` instead of a new tensor."""
    if branch.requires_grad:
        return x + branch
    return branch.add_(x)


def channels_last_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply ``conv`` to a (B, H, W, C) tensor and return (B, H', W', C'); the permutes are
    views, so contiguous channels-last memory goes in and comes out without a copy."""
    return conv_with(conv, x.permute(0, 3, 1, 2), conv.weight, conv.bias).permute(0, 2, 3, 1)


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """Contiguous (B, C, H, W) copy of a channels-last-memory (B, C, H, W) map, what
    ``x.contiguous()`` gives. On the CPU it copies each image as one 2-D (H*W, C) ->
    (C, H*W) transpose, which PyTorch's CPU copy does in cache-sized tiles, 2-3x faster than
    the general strided copy behind ``contiguous()``; the backward pass turns the gradient
    back the same way. Elsewhere (a GPU: one kernel instead of one per image) and in a graph
    being traced or compiled (a loop over the batch would fix its size) it is one
    ``contiguous()``."""
    if x.is_contiguous():
        return x
    if x.device.type != 'cpu' or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return x.contiguous()
    return _ChannelsFirst.apply(x)


class _ChannelsFirst(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return transpose_images(x, to_channels_last=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if not grad.is_contiguous():  # e.g. the expanded gradient of a mean
            return grad.contiguous(memory_format=torch.channels_last)
        return transpose_images(grad, to_channels_last=True)


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """``block(x)``, recomputed in the backward pass instead of stored when asked. The
    recomputation leaves BatchNorm running statistics alone, so they end up as without it.
    In a graph being compiled the recomputation is part of the compiled backward pass and
    updates nothing, so no context is needed there (and dynamo cannot trace one)."""
    if not use_checkpoint:
        return block(x)
    if torch.compiler.is_compiling():
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), running_stats_frozen(block)))


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Within the context, training-mode BatchNorms in ``module`` normalise with batch
    statistics as usual but do not update their running statistics."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.running_mean is not None]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def init_from_scratch(module: nn.Module) -> None:
    """The authors' initialisation for training from scratch."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._NormBase)) \
            and module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def per_stage_drop_path_rates(blocks: Sequence[int], drop_path_rate: float) -> List[List[float]]:
    """The authors' schedule: within each stage, rates rise linearly from 0 to the maximum."""
    return [torch.linspace(0, drop_path_rate, n).tolist() for n in blocks]


class ConvMLPFeatures(nn.Module):
    """The ConvMLP network without its classifier: tokenizer, convolutional stage and three
    MLP stages. :meth:`forward_taps` yields the four feature maps of the spec."""

    def __init__(self, arch: Union[str, Mapping] = 's', drop_path_rate: float = 0.1,
                 norm_layer: NormLayer = nn.BatchNorm2d, with_cp: bool = False,
                 in_chans: int = 3):
        super().__init__()
        settings = resolve_arch(arch)
        check_drop_path_rate(drop_path_rate)
        blocks, widths = settings['blocks'], settings['widths']
        stem = settings['stem_width']
        self.tokenizer = Tokenizer(stem, norm_layer, in_chans)
        self.conv_stages = ConvStage(settings['conv_blocks'], stem, widths[0], widths[0],
                                     norm_layer, with_cp)
        rates = per_stage_drop_path_rates(blocks, drop_path_rate)
        self.stages = nn.ModuleList(
            ConvMLPStage(widths[i], int(widths[i] * settings['mlp_ratios'][i]), rates[i],
                         out_width=widths[i + 1] if i + 1 < len(widths) else 0,
                         with_cp=with_cp)
            for i in range(len(blocks)))
        #: Channels of the four taps, in order.
        self.tap_channels: Tuple[int, ...] = (stem, widths[0], widths[1], widths[2])
        self.apply(init_from_scratch)
        # Convolution weights in the layout of the activations they meet, so no call has to
        # reorder them; loading weights into them keeps this layout.
        self.to(memory_format=torch.channels_last)

    def parts(self) -> List[nn.Module]:
        """The parts that ``frozen_stages`` counts, in order."""
        return [self.tokenizer, self.conv_stages, *self.stages]

    def forward_taps(self, x: torch.Tensor, last: int = NUM_TAPS - 1
                     ) -> Iterator[Tuple[int, torch.Tensor]]:
        """Yield ``(index, map)`` for taps 0..``last``; maps are channels-last-memory
        (B, C, H, W) views. Stops computing after tap ``last``."""
        x = self.tokenizer(x.contiguous(memory_format=torch.channels_last))
        yield 0, x
        if last < 1:
            return
        x = self.conv_stages(x)
        yield 1, x
        if last < 2:
            return
        x = self.stages[0](x.permute(0, 2, 3, 1))
        yield 2, x.permute(0, 3, 1, 2)
        if last < 3:
            return
        x = self.stages[2](self.stages[1](x))
        yield 3, x.permute(0, 3, 1, 2)
