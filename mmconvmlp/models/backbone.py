"""The ConvMLP backbone for OpenMMLab 2.x codebases (mmdet 3.x, mmseg 1.x, ...)."""
import copy
import warnings
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from .convmlp import NUM_PARTS, NUM_TAPS, ConvMLPFeatures
from .weights import load_convmlp_weights, select_prefix, unwrap_state_dict

#: Checkpoint schemes of model zoos (mmengine's ``CheckpointLoader``) that hold other
#: architectures' weights, never ConvMLP's: a ``pretrained`` naming one comes from a stock
#: config written for another backbone.
OTHER_MODEL_ZOOS = ('open-mmlab://', 'openmmlab://', 'torchvision://', 'modelzoo://',
                    'mmcls://')


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
        pretrained: what mmseg's stock configs pass on (deprecated there, use ``init_cfg``).
            A model-zoo name of another architecture (``open-mmlab://resnet50_v1c``,
            ``torchvision://...``) is ignored with a warning, and nothing is downloaded; any
            other path or URL becomes ``init_cfg=dict(type='Pretrained', checkpoint=...)``
            with a deprecation warning. Where ``init_cfg`` is given too, it wins.

    In a TorchScript module the maps come as a list (TorchScript has no tuples of varying
    length).
    """

    __jit_unused_properties__ = ['out_channels', 'is_init']  # TorchScript skips them

    def __init__(self,
                 arch: Union[str, Mapping] = 's',
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 norm_cfg: Mapping = dict(type='BN', requires_grad=True),
                 drop_path_rate: float = 0.1,
                 with_cp: bool = False,
                 compile: bool = False,
                 init_cfg: Optional[Union[Mapping, Sequence[Mapping]]] = None,
                 pretrained: Optional[str] = None):
        if not (isinstance(frozen_stages, int) and not isinstance(frozen_stages, bool)
                and -1 <= frozen_stages < NUM_PARTS):
            raise ValueError(f'ConvMLP frozen_stages={frozen_stages!r} is invalid: give -1 '
                             f'(nothing frozen) up to {NUM_PARTS - 1} (0 tokenizer, 1 conv '
                             f'stage, 2-4 MLP stages).')
        self.out_indices = normalize_out_indices(out_indices)
        norm_cfg = dict(norm_cfg)
        from mmcv.cnn import build_norm_layer  # registers the norm layers on first use
        super().__init__(arch=arch, drop_path_rate=drop_path_rate, with_cp=with_cp,
                         norm_layer=lambda channels: build_norm_layer(norm_cfg, channels)[1],
                         compile=compile)
        self.init_cfg = init_cfg_with_pretrained(copy.deepcopy(init_cfg), pretrained)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze_parts()

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of the returned maps, in order: what a neck's ``in_channels`` takes."""
        return tuple(self.tap_channels[i] for i in self.out_indices)

    def forward(self, x: torch.Tensor):
        """(B, 3, H, W) -> a tuple of the selected maps, contiguous (B, C_i, ceil(H/s_i),
        ceil(W/s_i)) for strides s = 4, 8, 16, 32. Parts after the last selected map are not
        run."""
        taps = self.taps(x, self.out_indices[-1])
        outs: List[torch.Tensor] = []
        for index in self.out_indices:
            outs.append(taps[index].contiguous())
        if torch.jit.is_scripting():
            return outs
        return tuple(outs)

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
        from mmengine.runner.checkpoint import CheckpointLoader
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
    from mmengine.model import PretrainedInit
    cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
    pretrained = [cfg for cfg in cfgs if cfg.get('type') in ('Pretrained', PretrainedInit)]
    if len(pretrained) > 1:
        raise ValueError(f'ConvMLP init_cfg holds {len(pretrained)} Pretrained entries: give '
                         f'one checkpoint to load.')
    return (pretrained[0] if pretrained else None), [cfg for cfg in cfgs if cfg not in pretrained]


def init_cfg_with_pretrained(init_cfg: Optional[Union[Mapping, Sequence[Mapping]]],
                             pretrained: Optional[str]
                             ) -> Optional[Union[Mapping, Sequence[Mapping]]]:
    """``init_cfg`` after the deprecated ``pretrained`` of mmseg's configs (see
    :class:`ConvMLP`), warning once for what happens to ``pretrained``."""
    if pretrained is None:
        return init_cfg
    if not isinstance(pretrained, str):
        raise TypeError(f'ConvMLP pretrained={pretrained!r} is invalid: give a checkpoint path '
                        f'or URL as a str, or None.')
    if pretrained.startswith(OTHER_MODEL_ZOOS):
        warnings.warn(
            f'ConvMLP ignores pretrained={pretrained!r}: those are weights of another '
            f'architecture (set by a stock config), and nothing is downloaded. To start from '
            f'ConvMLP weights, set init_cfg=dict(type=\'Pretrained\', checkpoint=...).',
            stacklevel=3)
        return init_cfg
    if init_cfg:
        warnings.warn(f'ConvMLP got both pretrained={pretrained!r} and init_cfg: using init_cfg '
                      f'and ignoring pretrained.', stacklevel=3)
        return init_cfg
    warnings.warn('DeprecationWarning: ConvMLP pretrained is deprecated, use init_cfg=dict('
                  f'type=\'Pretrained\', checkpoint={pretrained!r}) instead; loading it that '
                  f'way now.', stacklevel=3)
    return dict(type='Pretrained', checkpoint=pretrained)
