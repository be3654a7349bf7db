"""mmconvmlp: ConvMLP backbones for MMDetection 3.x and MMSegmentation 1.x.

Importing the package registers ``ConvMLP`` in mmengine's root model registry, which every
OpenMMLab 2.x scope falls back to, the timm models ``convmlp_s/m/l``, and what
:mod:`mmconvmlp.engine` adds to mmengine (``ConvMLPRunner``, the optimizer wrappers), and
lets torch's safe loading read mmengine's checkpoints through checking stand-ins. Nothing
else in the process changes. In a config:
``custom_imports = dict(imports=['mmconvmlp'], allow_failed_imports=False)``.
"""
from . import engine  # noqa: F401  (registers the runtime parts, allows the checkpoints)
from .models import ConvMLP

__version__ = '0.1.0'
__all__ = ['ConvMLP', '__version__']
