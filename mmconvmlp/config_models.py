"""The model of an MMDetection / MMSegmentation config, built in that config's scope.

One helper for everything that needs a config's model outside a Runner: the checkpoint
converter (names and shapes to check against), ``tools/analysis/get_flops.py`` and the tests.
"""
import importlib
from typing import Union

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

__all__ = ['build_config_model']


def build_config_model(config: Union[str, Config]) -> torch.nn.Module:
    """Build ``config``'s ``model`` (a config file or a loaded :class:`Config`) in the
    scope its ``default_scope`` names (``'mmdet'``, ``'mmseg'``, ...), ConvMLP registered.

    Nothing is initialised or loaded: ``init_weights`` is not called, so an ``init_cfg``
    with a checkpoint URL downloads nothing. Raises ``ValueError`` for a config without a
    ``default_scope``."""
    import mmconvmlp  # noqa: F401  (registers ConvMLP, with or without custom_imports)
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    scope = cfg.get('default_scope')
    if not scope:
        raise ValueError(f'{cfg.filename or "the config"} sets no default_scope: it should '
                         "inherit from an mmdet ('mmdet') or mmseg ('mmseg') base config.")
    importlib.import_module(f'{scope}.models')  # registers the codebase's models
    models = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return models.build(cfg.model)
