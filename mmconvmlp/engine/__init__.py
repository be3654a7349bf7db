"""What mmconvmlp adds to mmengine's training machinery (registered on import)."""
from .precision import BF16AutocastOptimWrapper, mixed_precision_optim_wrapper

__all__ = ['BF16AutocastOptimWrapper', 'mixed_precision_optim_wrapper']
