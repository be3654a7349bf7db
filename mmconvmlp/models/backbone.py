"""The ConvMLP backbone for OpenMMLab 2.x codebases (mmdet 3.x, mmseg 1.x, ...)."""
import copy
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule, PretrainedInit
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader
from torch.nn.modules.batchnorm import _BatchNorm

from .compiled import compiled_taps_if, taps
from .convmlp import NUM_PARTS, NUM_TAPS, ConvMLPFeatures, channels_first
from .weights import load_convmlp_weights, select_prefix, unwrap_state_dict


def normalize_out_indices(out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """Check ``out_indices`` against the four taps; negative indices count from the end."""
    indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
    valid = f'indices of the {NUM_TAPS} feature maps (0 stride 4, 1 stride 8, 2 stride 16, ' \
            f'3 stride 32; negative counts from the end), increasing'
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool)
                              and -NUM_TAPS <= i < NUM_TAPS for i in indices):
        raise ValueError(f'ConvMLP out_indices={out_indices!r} is invalid: give {valid}.')
    normalized = tuple(i % NUM_TAPS for i in indices)
    if any(a >= b for a, b in zip(normalized, normalized[1:])):
        raise ValueError(f'ConvMLP out_indices={out_indices!r} must be increasing without '
                         f'repeats: give {valid}.')
    return normalized


@MODELS.register_module()
class ConvMLP(ConvMLPFeatures, BaseModule):
    """ConvMLP backbone: ``(B, 3, H, W)`` images to a tuple of ``(B, C_i, H_i, W_i)`` maps.

    Registered in mmengine's root model registry, so every OpenMMLab 2.x scope (mmdet,
    mmseg, mmpretrain, ...) builds it from ``dict(type='ConvMLP', ...)``.

    Args:
        arch: ``'s'``, ``'m'``, ``'l'`` or a dict with the keys of
            :data:`mmconvmlp.models.convmlp.ARCH_KEYS`.
        out_indices: which of the four maps to return, increasing: 0 tokenizer (stride 4),
            1 convolutional stage (stride 8), 2 MLP stage 0 after downsampling (stride 16),
            3 MLP stage 2 (stride 32). Their channels are :attr:`out_channels`.
        frozen_stages: freeze parts 0..k (0 tokenizer, 1 conv stage, 2-4 MLP stages):
            no gradients, BatchNorm in eval mode. -1 freezes nothing.
        norm_eval: keep every BatchNorm in eval mode during training.
        norm_cfg: config of the BatchNorm layers, e.g. ``dict(type='SyncBN')``.
        drop_path_rate: the largest stochastic-depth rate; within each MLP stage the rates
            rise linearly from 0 to it, as in the authors' models.
        with_cp: recompute the blocks in the backward pass instead of storing their
            activations (less memory, same outputs and gradients).
        compile: run the network through ``torch.compile`` (see
            :mod:`mmconvmlp.models.compiled`); where compiling fails, it warns once and runs
            eager. Same parameter names and results (to rounding) as without.
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` for the authors'
            ImageNet checkpoints, or with ``prefix='backbone.'`` for a detector's or
            segmentor's. The classifier is ignored; any other mismatch raises, by name.
    """

    def __init__(self,
                 arch: Union[str, Mapping] = 's',
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 norm_cfg: Mapping = dict(type='BN', requires_grad=True),
                 drop_path_rate: float = 0.1,
                 with_cp: bool = False,
                 compile: bool = False,
                 init_cfg: Optional[Union[Mapping, Sequence[Mapping]]] = None):
        if not (isinstance(frozen_stages, int) and not isinstance(frozen_stages, bool)
                and -1 <= frozen_stages < NUM_PARTS):
            raise ValueError(f'ConvMLP frozen_stages={frozen_stages!r} is invalid: give -1 '
                             f'(nothing frozen) up to {NUM_PARTS - 1} (0 tokenizer, 1 conv '
                             f'stage, 2-4 MLP stages).')
        self.out_indices = normalize_out_indices(out_indices)
        norm_cfg = dict(norm_cfg)
        super().__init__(arch=arch, drop_path_rate=drop_path_rate, with_cp=with_cp,
                         norm_layer=lambda channels: build_norm_layer(norm_cfg, channels)[1])
        self.init_cfg = copy.deepcopy(init_cfg)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.compiled_taps = compiled_taps_if(compile, type(self).__name__)
        self._freeze_parts()

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of the returned maps, in order: what a neck's ``in_channels`` takes."""
        return tuple(self.tap_channels[i] for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> the selected maps, contiguous (B, C_i, ceil(H/s_i), ceil(W/s_i))
        for strides s = 4, 8, 16, 32. Parts after the last selected map are not run."""
        return tuple(channels_first(tap) for index, tap in
                     taps(self, self.compiled_taps, x, last=self.out_indices[-1])
                     if index in self.out_indices)

    def _freeze_parts(self) -> None:
        for part in self.parts()[:self.frozen_stages + 1]:
            part.eval()
            part.requires_grad_(False)

    def train(self, mode: bool = True) -> 'ConvMLP':
        super().train(mode)
        self._freeze_parts()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self) -> None:
        """Load a ``Pretrained`` ``init_cfg`` (alone or in a list) strictly, see the class
        docs; the other ``init_cfg`` entries go through mmengine first, as usual."""
        pretrained, others = split_pretrained(self.init_cfg)
        if pretrained is None or others:
            full_cfg, self.init_cfg = self.init_cfg, others or None
            try:
                super().init_weights()
            finally:
                self.init_cfg = full_cfg
        if pretrained is None:
            return
        source = pretrained['checkpoint']
        checkpoint = CheckpointLoader.load_checkpoint(source, map_location='cpu')
        state_dict = select_prefix(unwrap_state_dict(checkpoint), pretrained.get('prefix', ''))
        load_convmlp_weights(self, state_dict, source=f'checkpoint {source}')
        self._is_init = True


def split_pretrained(init_cfg: Optional[Union[Mapping, Sequence[Mapping]]]
                     ) -> Tuple[Optional[Mapping], list]:
    """The ``Pretrained`` entry of ``init_cfg`` (a dict or a list of dicts), or None, and the
    other entries. More than one ``Pretrained`` entry raises ``ValueError``."""
    if not init_cfg:
        return None, []
    cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
    pretrained = [cfg for cfg in cfgs if cfg.get('type') in ('Pretrained', PretrainedInit)]
    if len(pretrained) > 1:
        raise ValueError(f'ConvMLP init_cfg holds {len(pretrained)} Pretrained entries: give '
                         f'one checkpoint to load.')
    return (pretrained[0] if pretrained else None), [cfg for cfg in cfgs if cfg not in pretrained]
