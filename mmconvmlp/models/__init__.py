from .backbone import ConvMLP
from .convmlp import ARCH_SETTINGS, ConvMLPFeatures
from .weights import CheckpointMismatchError, load_convmlp_weights

__all__ = ['ARCH_SETTINGS', 'CheckpointMismatchError', 'ConvMLP', 'ConvMLPFeatures',
           'load_convmlp_weights']
