"""Evaluate only the weights of the model of the config.

mmengine loads whatever part of a checkpoint fits the model and leaves the rest at random
values with a warning, so a checkpoint of another model evaluates to a mAP of 0.000.
:func:`check_weights_fit` raises :class:`WeightsMismatchError` instead, listing what does
not match. :class:`~.runner.ConvMLPRunner` checks the checkpoint of a test or validation
run (not of training, where ``load_from`` may start from another model on purpose), and
``tools/infer.py`` the checkpoint of its inferencer.
"""
from mmengine.hooks import Hook
from mmengine.model import BaseTTAModel, is_model_wrapper

from .readable_errors import ReadableError


class WeightsMismatchError(ReadableError, ValueError):
    """A checkpoint lacks weights of the model, or holds them with other shapes."""


def check_weights_fit(model, checkpoint: dict, checkpoint_path: str) -> None:
    """Raise :class:`WeightsMismatchError` when a weight of ``model`` is missing from the
    checkpoint or has another shape there. Entries the model does not have are ignored, as
    mmengine ignores them."""
    state = checkpoint.get('state_dict', checkpoint)
    state = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    misshaped = [f'{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}'
                 for k, v in expected.items()
                 if k in state and tuple(getattr(state[k], 'shape', ())) != tuple(v.shape)]
    if not missing and not misshaped:
        return
    details = []
    if missing:
        details.append(f'{len(missing)} missing (e.g. {", ".join(missing[:3])})')
    if misshaped:
        details.append(f'{len(misshaped)} with another shape (e.g. {"; ".join(misshaped[:3])})')
    raise WeightsMismatchError(
        f'{checkpoint_path} does not fit the model of the config: of its {len(expected)} '
        f'weights, {" and ".join(details)}. Is it a checkpoint of another model? Give the '
        'checkpoint trained with this config.')


class CheckWeightsFitHook(Hook):
    """Checks the checkpoint a runner loads (``load_from``) against its model."""

    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model
        while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
            model = model.module
        check_weights_fit(model, checkpoint, runner._load_from)
