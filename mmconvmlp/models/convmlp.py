"""ConvMLP (Li et al., 2021): the network, in one path that every tracer and exporter takes.

It reads top-down as the paper's figure::

    image (B, 3, H, W)
      tokenizer        3x [3x3 conv, BN, ReLU], 3x3 max-pool      -> tap 0, stride 4,  C
      conv_stages      residual bottlenecks, 3x3 s2 conv          -> tap 1, stride 8,  D0
      stages[0]        ConvMLP blocks at D0, 3x3 s2 conv -> D1    -> tap 2, stride 16, D1
      stages[1]        ConvMLP blocks at D1, 3x3 s2 conv -> D2       (not tapped)
      stages[2]        ConvMLP blocks at D2                       -> tap 3, stride 32, D2

Every part maps a ``(B, C, H, W)`` map in ``torch.channels_last`` memory to another, so the
four taps are the outputs of four modules (``tokenizer``, ``conv_stages``, ``stages.0``,
``stages.2``). Inside an MLP stage the blocks work on ``(B, H, W, C)`` tensors, the same
memory seen through a permute: the depthwise and downsampling convolutions take their
``(B, C, H, W)`` view without a copy and hand back memory that is again contiguous
``(B, H, W, C)``. The convolution weights are stored channels-last to match
(:class:`ConvMLPFeatures`).

This module holds no speed-ups that depend on the machine. The opt-in layers for the CPU
live beside it in :mod:`mmconvmlp.models.cpu_speed`, and ``compile=True`` in
:mod:`mmconvmlp.models.compiled`; both leave the module tree and its parameter names alone.
Module and parameter names follow the authors' released ImageNet checkpoints, which therefore
load as they are.
"""
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

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


# -- the convolutional front end (channels-last memory, (B, C, H, W) shapes) ---------------

def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, stride: int,
                 norm_layer: NormLayer) -> List[nn.Module]:
    """A convolution without bias, its norm and a ReLU."""
    return [nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
            norm_layer(out_ch), nn.ReLU(inplace=True)]


class Tokenizer(nn.Module):
    """(B, 3, H, W) -> (B, C, H/4, W/4): three 3x3 conv-BN-ReLU (the first with stride 2),
    then a 3x3 stride-2 max-pool. ``block`` holds the convs at 0, 3, 6 and the norms at
    1, 4, 7, as in the authors' checkpoints."""

    def __init__(self, stem_width: int, norm_layer: NormLayer, in_chans: int = 3):
        super().__init__()
        half = stem_width // 2
        self.block = nn.Sequential(
            *conv_bn_relu(in_chans, half, 3, 2, norm_layer),
            *conv_bn_relu(half, half, 3, 1, norm_layer),
            *conv_bn_relu(half, stem_width, 3, 1, norm_layer),
            nn.MaxPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Bottleneck(nn.Sequential):
    """(B, C, H, W) -> (B, C, H, W): ``x + f(x)``, f = 1x1 C->D, 3x3 D->D, 1x1 D->C, each
    conv-BN-ReLU (convs at 0, 3, 6, norms at 1, 4, 7)."""

    def __init__(self, width: int, hidden: int, norm_layer: NormLayer):
        super().__init__(*conv_bn_relu(width, hidden, 1, 1, norm_layer),
                         *conv_bn_relu(hidden, hidden, 3, 1, norm_layer),
                         *conv_bn_relu(hidden, width, 1, 1, norm_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = x
        for layer in self:
            branch = layer(branch)
        return x + branch


class ConvStage(nn.Module):
    """(B, C, H, W) -> (B, D0, H/2, W/2): residual bottlenecks at width C, then a 3x3
    stride-2 conv with bias."""

    def __init__(self, num_blocks: int, width: int, hidden: int, out_width: int,
                 norm_layer: NormLayer, with_cp: bool = False):
        super().__init__()
        self.conv_blocks = Blocks([Bottleneck(width, hidden, norm_layer)
                                   for _ in range(num_blocks)], with_cp)
        self.downsample = nn.Conv2d(width, out_width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.conv_blocks(x))


# -- the MLP stages (channels-last (B, H, W, C) tensors) -----------------------------------

class ChannelMLP(nn.Module):
    """(..., C) -> (..., C): Linear C->hidden, exact GELU, Linear hidden->C."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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
            return x + branch
        keep_prob = 1. - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        scale = x.new_empty(mask_shape).bernoulli_(keep_prob).div_(keep_prob)
        return torch.addcmul(x, branch, scale)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class ConvMLPBlock(nn.Module):
    """(B, H, W, C) -> (B, H, W, C): channel MLP, 3x3 depthwise conv, channel MLP, each
    behind its own LayerNorm; the two MLPs are residual, the depthwise conv is not. The
    conv takes the (B, C, H, W) view of contiguous (B, H, W, C) memory, which is
    channels-last memory, and its output's (B, H, W, C) view is contiguous again."""

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
        x = self.drop_path(x, self.channel_mlp1(self.norm1(x)))
        x = self.connect(self.connect_norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop_path(x, self.channel_mlp2(self.norm2(x)))


class ConvDownsample(nn.Module):
    """(B, H, W, Cin) -> (B, ceil(H/2), ceil(W/2), Cout) with a 3x3 stride-2 conv (on the
    channels-last (B, C, H, W) view, as in :class:`ConvMLPBlock`)."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.downsample = nn.Conv2d(in_width, out_width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvMLPStage(nn.Module):
    """(B, D, H, W) -> (B, D, H, W), or (B, D_next, H/2, W/2) when it downsamples, in
    channels-last memory; its blocks see the (B, H, W, D) permute. One block per entry of
    ``drop_path_rates``."""

    def __init__(self, width: int, hidden: int, drop_path_rates: Sequence[float],
                 out_width: int = 0, with_cp: bool = False):
        super().__init__()
        self.blocks = Blocks([ConvMLPBlock(width, hidden, rate) for rate in drop_path_rates],
                             with_cp)
        self.downsample_mlp = ConvDownsample(width, out_width) if out_width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_mlp(self.blocks(x.permute(0, 2, 3, 1)))
        return x.permute(0, 3, 1, 2)


# -- shared parts --------------------------------------------------------------------------

class Blocks(nn.Sequential):
    """Blocks run in order. With ``with_cp`` in training each block is recomputed in the
    backward pass instead of keeping its activations (less memory, same results)."""

    def __init__(self, blocks: Sequence[nn.Module], with_cp: bool = False):
        super().__init__(*blocks)
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training:
            return self.forward_checkpointed(x)
        for block in self:
            x = block(x)
        return x

    @torch.jit.unused
    def forward_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks through :func:`torch.utils.checkpoint.checkpoint`. The recomputation
        leaves BatchNorm running statistics alone, so they end up as without it. In a graph
        being compiled the recomputation is part of the compiled backward pass and updates
        nothing, so no context is needed there (and dynamo cannot trace one)."""
        for block in self:
            if torch.compiler.is_compiling():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = checkpoint(block, x, use_reentrant=False, context_fn=lambda block=block: (
                    nullcontext(), running_stats_frozen(block)))
        return x


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
    return [[drop_path_rate * i / max(n - 1, 1) for i in range(n)] for n in blocks]


# -- the network ---------------------------------------------------------------------------

class ConvMLPFeatures(nn.Module):
    """The ConvMLP network without its classifier: tokenizer, convolutional stage and three
    MLP stages. :meth:`forward_taps` returns the four feature maps of the spec.

    ``compile=True`` runs :meth:`forward_taps` through ``torch.compile`` (see
    :mod:`mmconvmlp.models.compiled`); where compiling fails, it warns once and runs eager.
    """

    def __init__(self, arch: Union[str, Mapping] = 's', drop_path_rate: float = 0.1,
                 norm_layer: NormLayer = nn.BatchNorm2d, with_cp: bool = False,
                 in_chans: int = 3, compile: bool = False):
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
        from .compiled import compiled_taps_if
        self.compiled_taps = compiled_taps_if(compile, type(self).__name__)
        self.compiles = self.compiled_taps is not None
        self.apply(init_from_scratch)
        # Convolution weights in the layout of the activations they meet, so no call has to
        # reorder them; loading weights into them keeps this layout.
        self.to(memory_format=torch.channels_last)

    def parts(self) -> List[nn.Module]:
        """The parts that ``frozen_stages`` counts, in order."""
        return [self.tokenizer, self.conv_stages, *self.stages]

    def forward_taps(self, x: torch.Tensor, last: int = NUM_TAPS - 1) -> List[torch.Tensor]:
        """(B, in_chans, H, W) -> taps 0..``last`` as channels-last-memory (B, C_i, H_i, W_i)
        maps; the parts after tap ``last`` do not run."""
        x = self.tokenizer(x.contiguous(memory_format=torch.channels_last))
        taps = [x]
        if last >= 1:
            x = self.conv_stages(x)
            taps.append(x)
        for i, stage in enumerate(self.stages):
            if len(taps) <= last:
                x = stage(x)
                if i != 1:  # stage 1's output is not a tap
                    taps.append(x)
        return taps

    def taps(self, x: torch.Tensor, last: int) -> List[torch.Tensor]:
        """:meth:`forward_taps`, compiled with ``compile=True``."""
        if self.compiles:
            return self.compiled_forward_taps(x, last)
        return self.forward_taps(x, last)

    @torch.jit.unused
    def compiled_forward_taps(self, x: torch.Tensor, last: int) -> List[torch.Tensor]:
        return self.compiled_taps(self, x, last)
