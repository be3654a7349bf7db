"""``convmlp_s/m/l`` in timm's registry without importing timm before anyone asks for it.

Importing timm takes seconds (it imports all of its models, torchvision and
huggingface_hub), and a config's ``custom_imports = dict(imports=['mmconvmlp'])`` needs none
of it. So :func:`register_with_timm` registers the models at once where timm is already
imported, and otherwise as soon as timm's own import finishes: a finder on ``sys.meta_path``
waits for the one name ``timm``, lets the usual finders and loader import it, then imports
:mod:`.timm_models` (whose ``@register_model`` decorators register the models) and takes
itself off the path. ``import timm`` then gives timm with the models, as if
:mod:`.timm_models` had been imported first; the module's spec and loader are timm's own.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Optional, Sequence

MODELS_MODULE = 'mmconvmlp.models.timm_models'


def register_with_timm() -> None:
    """Register ``convmlp_s/m/l`` with timm now if timm is imported, else when it is."""
    if 'timm' in sys.modules:
        importlib.import_module(MODELS_MODULE)
    elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``timm`` it takes the spec the other finders give and
    has the models registered once timm's module has run."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != 'timm':
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec('timm')
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """timm's loader, then :data:`MODELS_MODULE`; hands timm's loader back to the module."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        importlib.import_module(MODELS_MODULE)
