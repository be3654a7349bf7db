"""ConvMLP-S/M/L as timm models: ``convmlp_s``, ``convmlp_m``, ``convmlp_l``.

Importing :mod:`mmconvmlp` registers them, after which timm builds them like any of its own::

    import mmconvmlp  # noqa: F401  (registers the models)
    import timm

    clf = timm.create_model('convmlp_s', pretrained=True)   # the released ImageNet weights
    clf = timm.create_model('convmlp_s', pretrained=True,
                            pretrained_cfg_overlay=dict(file='convmlp_s_imagenet.pth'))
    fpn_in = timm.create_model('convmlp_s', features_only=True, out_indices=(0, 1, 2, 3))

The classifier is :class:`ConvMLPClassifier`, a subclass of
:class:`~mmconvmlp.models.convmlp.ConvMLPFeatures` (the network behind the OpenMMLab backbone
too) that adds the paper's head: LayerNorm over the last stage, the mean over all positions,
and a linear layer. Its parameter names are those of the authors' ImageNet checkpoints, so
those load without any renaming.

``features_only=True`` wraps the model in timm's ``FeatureGetterNet``, which calls
:meth:`ConvMLPClassifier.forward_intermediates`: the four maps of the spec, i.e. index 0
tokenizer (stride 4), 1 convolutional stage (stride 8), 2 MLP stage 0 after its downsampling
(stride 16), 3 MLP stage 2 (stride 32).

Indices follow timm's convention here, which differs from the OpenMMLab backbone's for a
plain ``int``: ``out_indices=2`` (and ``indices=2``) means *the last two maps* (2 and 3) in
timm, but *map 2 only* in ``dict(type='ConvMLP', out_indices=2)``. A sequence means the same
in both: those maps, negative ones counted from the end.
"""
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .convmlp import NUM_TAPS, ConvMLPFeatures, NormLayer, init_from_scratch

__all__ = ['ConvMLPClassifier', 'TAP_MODULES', 'TAP_REDUCTIONS', 'CHECKPOINT_URLS',
           'take_indices']

#: Where each of the four taps comes from, and its stride.
TAP_MODULES = ('tokenizer', 'conv_stages', 'stages.0', 'stages.2')
TAP_REDUCTIONS = (4, 8, 16, 32)
#: The authors' released ImageNet-1k classifiers.
CHECKPOINT_URLS = {
    arch: f'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_{arch}_imagenet.pth'
    for arch in ('s', 'm', 'l')
}
GLOBAL_POOLS = ('', 'avg')


def take_indices(indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """timm's reading of feature ``indices`` for the four maps: ``None`` all, an ``int`` n
    the last n, a sequence those maps (negative from the end). Returns ``(absolute indices,
    the largest)``; raises ``ValueError`` naming what is valid. (timm 1.0 has this as
    ``timm.models._features.feature_take_indices``, a private module, with assertions.)"""
    valid = (f'an int n (the last n of the {NUM_TAPS} maps, 1 to {NUM_TAPS}) or a sequence '
             f'of map indices -{NUM_TAPS}..{NUM_TAPS - 1}')
    if indices is None:
        indices = NUM_TAPS
    if isinstance(indices, int):
        if not 0 < indices <= NUM_TAPS:
            raise ValueError(f'ConvMLP feature indices={indices!r}: give {valid}.')
        taken = list(range(NUM_TAPS - indices, NUM_TAPS))
    else:
        indices = list(indices)
        if not indices or not all(isinstance(i, int) and -NUM_TAPS <= i < NUM_TAPS
                                  for i in indices):
            raise ValueError(f'ConvMLP feature indices={indices!r}: give {valid}.')
        taken = [i % NUM_TAPS for i in indices]
    return taken, max(taken)


class ConvMLPClassifier(ConvMLPFeatures):
    """The ConvMLP ImageNet classifier with timm's model API.

    Args:
        arch: ``'s'``, ``'m'``, ``'l'`` or a custom arch dict (see ``ConvMLPFeatures``).
        num_classes: classifier outputs; 0 gives no classifier (``head`` is an identity).
        in_chans: input channels; the first tokenizer convolution is sized for them.
        global_pool: ``'avg'`` (the mean over all positions) or ``''`` (no pooling).
        drop_rate: dropout before the classifier.
        drop_path_rate: the largest stochastic-depth rate (per stage, rising from 0).
        norm_layer: the BatchNorm layer of the convolutional parts.
        compile: run the network (not the head) through ``torch.compile``, see
            :mod:`mmconvmlp.models.compiled`; where compiling fails, it warns once and runs
            eager.
        device, dtype: where and in what type the parameters are made (timm's factory
            arguments; ``device='meta'`` allocates nothing).
    """

    def __init__(self, arch: Union[str, Dict] = 's', num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = 'avg', drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer: Optional[NormLayer] = None, compile: bool = False,
                 device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None):
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f'ConvMLP global_pool={global_pool!r}: use one of {GLOBAL_POOLS}.')
        with torch.device(device) if device is not None else nullcontext():
            super().__init__(arch, drop_path_rate=drop_path_rate,
                             norm_layer=norm_layer or nn.BatchNorm2d, in_chans=in_chans,
                             compile=compile)
            width = self.tap_channels[-1]
            self.num_classes = num_classes
            self.in_chans = in_chans
            self.global_pool = global_pool
            self.drop_rate = drop_rate
            self.num_features = self.head_hidden_size = width
            #: The output format of :meth:`forward_features` (channels last).
            self.output_fmt = 'NHWC'
            self.feature_info: List[Dict[str, Any]] = [
                dict(num_chs=ch, reduction=red, module=mod)
                for ch, red, mod in zip(self.tap_channels, TAP_REDUCTIONS, TAP_MODULES)]
            self.norm = nn.LayerNorm(width)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
            self.norm.apply(init_from_scratch)
            self.head.apply(init_from_scratch)
            #: The last tap this model can still compute (lower after pruning).
            self._last_tap = NUM_TAPS - 1
        if dtype is not None:
            self.to(dtype)

    # -- classifier API -------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f'ConvMLP global_pool={global_pool!r}: use one of '
                                 f'{GLOBAL_POOLS}.')
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            like = self.norm.weight  # the new head's device and dtype
            self.head = nn.Linear(self.num_features, num_classes, device=like.device,
                                  dtype=like.dtype)
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the normalised last stage, (B, H/32, W/32, D2)."""
        return self.norm(self.taps(x, self._last_tap)[-1].permute(0, 2, 3, 1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, D2) -> logits (B, num_classes), or the pooled (B, D2) features when
        ``pre_logits``. Without pooling (``global_pool=''``) the positions stay."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- feature extraction API -----------------------------------------------------------
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The four maps of the spec (or those chosen by ``indices``, read as timm reads them:
        see :func:`take_indices`), as contiguous (B, C, H, W) in ``'NCHW'`` or (B, H, W, C)
        in ``'NHWC'``. ``norm`` applies the final LayerNorm to map 3 (the only map it fits).
        ``stop_early`` stops after the last map taken.

        Without ``intermediates_only`` the final features, (B, h, w, C) channels last, come
        first: the last map computed, normalised only when it is map 3 (timm's rule), so
        with ``stop_early`` and an earlier last index they are that map as it is."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"ConvMLP output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'.")
        taken, max_index = take_indices(indices)
        if max_index > self._last_tap:
            raise ValueError(f'ConvMLP feature index {max_index} was pruned; this model '
                             f'computes taps 0..{self._last_tap}.')
        last = max_index if (stop_early or intermediates_only) else self._last_tap
        taps = self.taps(x, last)
        intermediates = []
        for index, taken_map in enumerate(taps):
            if index not in taken:
                continue
            if norm and index == NUM_TAPS - 1:
                taken_map = self.norm(taken_map.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            # Contiguous NCHW: some consumers (mmcv's CPU RoIAlign) read raw memory as NCHW.
            intermediates.append(taken_map.permute(0, 2, 3, 1) if output_fmt == 'NHWC'
                                 else taken_map.contiguous())
        if intermediates_only:
            return intermediates
        final = taps[-1].permute(0, 2, 3, 1)
        return (self.norm(final) if len(taps) == NUM_TAPS else final), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True
                                  ) -> List[int]:
        """Drop what the maps at ``indices`` do not need: the parts after the last of them,
        the final norm (``prune_norm`` or when map 3 is not needed) and the classifier
        (``prune_head``). Returns the absolute indices kept."""
        taken, max_index = take_indices(indices)
        if max_index < 2:
            self.stages = nn.ModuleList()
        elif max_index < 3:
            self.stages = self.stages[:1]
        if max_index < 1:
            self.conv_stages = nn.Identity()
        self._last_tap = min(self._last_tap, max_index)
        if prune_norm or max_index < NUM_TAPS - 1:
            self.norm = nn.Identity()
        if prune_head or max_index < NUM_TAPS - 1:
            self.reset_classifier(0, '')
        return taken


def _cfg(arch: str, **kwargs) -> Dict[str, Any]:
    return dict(
        url=CHECKPOINT_URLS[arch], num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
        crop_pct=0.875, crop_mode='center', interpolation='bicubic', fixed_input_size=False,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='tokenizer.block.0', classifier='head', paper_ids='arXiv:2109.04454',
        **kwargs)


default_cfgs = generate_default_cfgs({
    'convmlp_s.in1k': _cfg('s'),
    'convmlp_m.in1k': _cfg('m'),
    'convmlp_l.in1k': _cfg('l'),
})


def _create_convmlp(variant: str, arch: str, pretrained: bool = False,
                    **kwargs) -> ConvMLPClassifier:
    out_indices = kwargs.pop('out_indices', tuple(range(NUM_TAPS)))
    return build_model_with_cfg(
        ConvMLPClassifier, variant, pretrained, arch=arch,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


@register_model
def convmlp_s(pretrained: bool = False, **kwargs) -> ConvMLPClassifier:
    """ConvMLP-S: 9.0M parameters, 76.8 top-1 on ImageNet-1k."""
    return _create_convmlp('convmlp_s', 's', pretrained, **kwargs)


@register_model
def convmlp_m(pretrained: bool = False, **kwargs) -> ConvMLPClassifier:
    """ConvMLP-M: 17.4M parameters, 79.0 top-1 on ImageNet-1k."""
    return _create_convmlp('convmlp_m', 'm', pretrained, **kwargs)


@register_model
def convmlp_l(pretrained: bool = False, **kwargs) -> ConvMLPClassifier:
    """ConvMLP-L: 42.7M parameters, 80.2 top-1 on ImageNet-1k."""
    return _create_convmlp('convmlp_l', 'l', pretrained, **kwargs)
