"""Training helpers for the OpenMMLab runners (registered on import)."""
from .optim_wrapper import BF16AutocastOptimWrapper

__all__ = ['BF16AutocastOptimWrapper']
