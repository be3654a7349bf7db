"""The model of an MMDetection / MMSegmentation config, built in that config's scope.

For everything that needs a config's model outside a Runner: the checkpoint converter
(names and shapes to check against), the analysis and deployment tools and the tests.
"""
import importlib
import importlib.util
import os.path as osp
import warnings
from typing import Tuple, Union

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from .engine.readable_errors import UsageError

__all__ = ['ConfigError', 'build_config_model', 'build_eval_model', 'load_model_config',
           'resolve_config']

#: The base class of the models each config scope may build: (module, class name).
BASE_CLASSES = {'mmdet': ('mmdet.models.detectors', 'BaseDetector'),
                'mmseg': ('mmseg.models.segmentors', 'BaseSegmentor')}


class ConfigError(UsageError, ValueError):
    """A config that cannot be used, told in one line: which and why."""


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


def resolve_config(name: str) -> str:
    """The file of ``name``: a path, or ``package::relative/path.py`` inside an installed
    OpenMMLab package (its ``.mim/configs`` folder, as ``_base_`` resolves it)."""
    if '::' in name:
        package, _, relative = name.partition('::')
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or spec.origin is None:
            raise ConfigError(f'{name}: no installed package {package!r} to take the '
                              f'config from (write e.g. mmdet::retinanet/FILE.py).')
        path = osp.join(osp.dirname(spec.origin), '.mim', 'configs', relative)
    else:
        path = name
    if not osp.isfile(path):
        raise ConfigError(f'{name}: no such config file ({path}).')
    return path


def load_model_config(name: str) -> Tuple[Config, str]:
    """``(Config, scope)`` of an mmdet detector or mmseg segmentor config named as
    :func:`resolve_config` takes it; nothing is built yet. Raises :class:`ConfigError`."""
    path = resolve_config(name)
    try:
        cfg = Config.fromfile(path)
    except Exception as error:  # a config is Python: any error may come out of it
        raise ConfigError(f'{name}: the config does not load: {error}') from error
    scope = cfg.get('default_scope')
    if scope not in BASE_CLASSES:
        raise ConfigError(f'{name}: default_scope is {scope!r}; only mmdet detector and '
                          f'mmseg segmentor configs can be used.')
    if not isinstance(cfg.get('model'), dict) or 'type' not in cfg.model:
        raise ConfigError(f'{name}: the config has no model with a type.')
    module, base_name = BASE_CLASSES[scope]
    base_class = getattr(importlib.import_module(module), base_name)
    with DefaultScope.overwrite_default_scope(scope):
        model_class = importlib.import_module(f'{scope}.registry').MODELS.get(cfg.model.type)
    if model_class is None:
        raise ConfigError(f'{name}: model type {cfg.model.type!r} is not registered in '
                          f'{scope}.')
    if not (isinstance(model_class, type) and issubclass(model_class, base_class)):
        raise ConfigError(f'{name}: its model {cfg.model.type!r} is not an {scope} '
                          f'{base_name}; give a detector or segmentor config.')
    return cfg, scope


def build_eval_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """The config's model in eval mode on ``device``, with random weights (as
    :func:`build_config_model`: nothing is downloaded or loaded). SyncBN layers become plain
    BatchNorm (the same in eval mode, and no process group)."""
    from mmengine.model import revert_sync_batchnorm
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation notes of stock models' arguments
        model = build_config_model(cfg)
    return revert_sync_batchnorm(model).to(device).eval()
