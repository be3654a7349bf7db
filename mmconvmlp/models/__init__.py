from .backbone import ConvMLP
from .convmlp import ARCH_SETTINGS, ConvMLPFeatures
from .timm_models import ConvMLPClassifier  # registers convmlp_s/m/l with timm
from .weights import CheckpointMismatchError, load_convmlp_weights

__all__ = ['ARCH_SETTINGS', 'CheckpointMismatchError', 'ConvMLP', 'ConvMLPClassifier',
           'ConvMLPFeatures',
           'load_convmlp_weights']
