"""Loading ConvMLP weights from checkpoints in the authors' layout, with every mismatch
named instead of skipped."""
from typing import Dict, Mapping

import torch
import torch.nn as nn

#: The ImageNet classifier, present in the released ImageNet checkpoints and unused by a
#: dense-prediction backbone.
CLASSIFIER_PREFIXES = ('head.', 'norm.')


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the model they are loaded into."""


def unwrap_state_dict(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: a plain state dict, or one stored under
    ``state_dict`` (MMDetection / MMSegmentation / mmengine) or ``model`` (timm, DeiT)."""
    for key in ('state_dict', 'model'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries under ``prefix`` (e.g. ``'backbone.'``), with the prefix removed."""
    if not prefix:
        return dict(state_dict)
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointMismatchError(
            f'No weights start with prefix {prefix!r}; the checkpoint\'s first names are '
            f'{list(state_dict)[:5]}.')
    return selected


def load_convmlp_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                         source: str = 'checkpoint', ignore_classifier: bool = True) -> None:
    """Copy ``state_dict`` into ``model`` and raise :class:`CheckpointMismatchError` naming
    every missing, unexpected and wrongly shaped entry; nothing is loaded in that case.

    ``ignore_classifier`` drops the ImageNet classifier (``head.*``, ``norm.*``) when the
    model has none."""
    own = model.state_dict()
    incoming = {k: v for k, v in state_dict.items()
                if not (ignore_classifier and k.startswith(CLASSIFIER_PREFIXES) and k not in own)}
    listing = describe_mismatch(own, incoming, source)
    if listing:
        unexpected = [k for k in incoming if k not in own]
        hint = ''
        if unexpected and all(k.startswith(('backbone.', 'module.')) for k in unexpected):
            hint = (" Its names carry a prefix: for a detector or segmentor checkpoint set "
                    "init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.').")
        elif 'shape mismatch' in listing:
            hint = ' Is the arch the one the checkpoint was trained with?'
        raise CheckpointMismatchError(
            f'The {source} does not fit {type(model).__name__}.{hint}\n{listing}')
    model.load_state_dict(incoming, strict=True)


def describe_mismatch(own: Mapping[str, torch.Tensor], incoming: Mapping[str, torch.Tensor],
                      source: str = 'checkpoint') -> str:
    """Every entry of ``own`` that ``incoming`` lacks or mis-shapes and every entry it has in
    excess, one per line; empty when they fit."""
    missing = [k for k in own if k not in incoming]
    unexpected = [k for k in incoming if k not in own]
    wrong_shape = [f'{k}: {tuple(incoming[k].shape)} in the {source}, {tuple(own[k].shape)} '
                   f'in the model' for k in own
                   if k in incoming and tuple(incoming[k].shape) != tuple(own[k].shape)]
    return (_listing('missing from the checkpoint', missing)
            + _listing('not in the model', unexpected)
            + _listing('shape mismatch', wrong_shape))


def _listing(title: str, names: list, limit: int = 20) -> str:
    if not names:
        return ''
    shown = ''.join(f'\n    {n}' for n in names[:limit])
    more = f'\n    ... and {len(names) - limit} more' if len(names) > limit else ''
    return f'  {len(names)} {title}:{shown}{more}\n'
