"""ConvMLP: the network (:mod:`.convmlp`), the OpenMMLab backbone (:mod:`.backbone`), the
timm models (:mod:`.timm_models`, registered with timm when timm is imported:
:mod:`.timm_registration`), checkpoint loading (:mod:`.weights`), and the opt-in speed
layers for CPUs (:mod:`.cpu_speed`) and torch.compile (:mod:`.compiled`)."""
from .backbone import ConvMLP
from .convmlp import ARCH_SETTINGS, ConvMLPFeatures
from .cpu_speed import (accelerate_for_cpu, accelerate_for_cpu_inference,
                        accelerate_for_cpu_training, remove_cpu_acceleration)
from .timm_registration import register_with_timm
from .weights import CheckpointMismatchError, load_convmlp_weights

register_with_timm()


def __getattr__(name: str):
    if name == 'ConvMLPClassifier':  # imports timm, so only on demand
        from .timm_models import ConvMLPClassifier
        return ConvMLPClassifier
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['ARCH_SETTINGS', 'CheckpointMismatchError', 'ConvMLP', 'ConvMLPClassifier',
           'ConvMLPFeatures', 'accelerate_for_cpu', 'accelerate_for_cpu_inference',
           'accelerate_for_cpu_training', 'load_convmlp_weights', 'remove_cpu_acceleration']
