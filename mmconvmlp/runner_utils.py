"""What ``tools/train.py`` and ``tools/test.py`` add around mmengine's Runner.

* :func:`check_data`: stop with a readable message when the data a config reads is absent.
* :func:`checkpoint_globals`: the mmengine / numpy classes inside mmengine's own checkpoints,
  allowed for ``torch.load``'s safe (``weights_only``) loading inside a ``with`` block, so
  that resuming and testing work on torch >= 2.6 without turning safe loading off.
* :func:`setup_cpu_distributed`: ``--launcher pytorch|slurm|mpi`` on a machine without CUDA
  (gloo process group, DDP without ``device_ids``), which mmengine 0.10.7 cannot start.
"""
import contextlib
import os
import os.path as osp
import pickle
import sys
import subprocess
import warnings
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as torch_dist
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS


class DataNotFoundError(FileNotFoundError):
    """Files a config's data loaders or evaluators read do not exist."""


#: Where each data set comes from, by the ``type`` of the dataset in the config.
DATA_HINTS: Dict[str, str] = {
    'CocoDataset': (
        'COCO 2017 is expected under {root} (annotations/instances_train2017.json, '
        'annotations/instances_val2017.json, train2017/, val2017/). Download "2017 Train '
        'images", "2017 Val images" and "2017 Train/Val annotations" from '
        'https://cocodataset.org/#download and unzip them there, or link an existing copy: '
        'mkdir -p {parent} && ln -s /path/to/coco {root_noslash}'),
    'ADE20KDataset': (
        'ADE20K (the SceneParsing challenge release) is expected under {root} '
        '(images/{{training,validation}}/, annotations/{{training,validation}}/). Download '
        'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip and unzip '
        'it into {parent}, or link an existing copy: mkdir -p {parent} && '
        'ln -s /path/to/ADEChallengeData2016 {root_noslash}'),
}

#: The config sections each tool reads data through.
TRAIN_SECTIONS = (('train_dataloader', 'train_cfg'), ('val_dataloader', 'val_cfg'),
                  ('val_evaluator', 'val_cfg'))
TEST_SECTIONS = (('test_dataloader', 'test_cfg'), ('test_evaluator', 'test_cfg'))


def _is_remote(path: str) -> bool:
    return '://' in path


def _join(root, path: str) -> str:
    if root and not osp.isabs(path) and not _is_remote(path):
        return osp.join(root, path)
    return path


def _datasets(dataset_cfg) -> Iterator[dict]:
    """The leaf dataset configs inside wrappers (RepeatDataset, ConcatDataset, ...)."""
    if not isinstance(dataset_cfg, dict):
        return
    inner = dataset_cfg.get('dataset', dataset_cfg.get('datasets'))
    if inner is None:
        yield dataset_cfg
    elif isinstance(inner, (list, tuple)):
        for item in inner:
            yield from _datasets(item)
    else:
        yield from _datasets(inner)


def _required_paths(section: str, section_cfg) -> List[Tuple[str, str, str, str]]:
    """(section, path, what, dataset type) for every local file or folder it reads."""
    found = []
    if section.endswith('_dataloader'):
        for ds in _datasets(section_cfg.get('dataset')):
            if ds.get('backend_args'):
                continue  # data on a storage backend: not a local path to check
            root = ds.get('data_root')
            kind = ds.get('type', '?')
            if ds.get('ann_file'):
                found.append((section, _join(root, ds['ann_file']), 'annotation file', kind))
            for key, prefix in (ds.get('data_prefix') or {}).items():
                if prefix:
                    found.append((section, _join(root, prefix), f'{key} folder', kind))
            if not ds.get('ann_file') and not ds.get('data_prefix') and root:
                found.append((section, root, 'data root', kind))
    else:  # an evaluator, or a list of them
        metrics = section_cfg if isinstance(section_cfg, (list, tuple)) else [section_cfg]
        for metric in metrics:
            if isinstance(metric, dict) and metric.get('ann_file') \
                    and not metric.get('backend_args'):
                found.append((section, metric['ann_file'], 'annotation file (evaluator)',
                              metric.get('type', '?')))
    return [item for item in found if not _is_remote(item[1])]


def missing_data(cfg, sections: Sequence[Tuple[str, str]]) -> List[Tuple[str, str, str, str]]:
    """The entries of :func:`_required_paths` that do not exist, for the config sections
    that are in use (a section counts when the loop config next to it is set)."""
    missing, seen = [], set()
    for section, loop in sections:
        if cfg.get(section) is None or cfg.get(loop) is None:
            continue
        for item in _required_paths(section, cfg[section]):
            if item[1] not in seen and not osp.exists(item[1]):
                seen.add(item[1])
                missing.append(item)
    return missing


def _hint(kind: str, path: str, data_roots: Sequence[str]) -> str:
    template = DATA_HINTS.get(kind)
    root = next((r for r in data_roots if r and path.startswith(r.rstrip('/'))), None)
    if template is None or root is None:
        return ('See the dataset preparation guide of MMDetection or MMSegmentation for '
                'how to obtain and lay out this data set.')
    root_noslash = root.rstrip('/')
    return template.format(root=root_noslash + '/', root_noslash=root_noslash,
                           parent=(osp.dirname(root_noslash) or '.') + '/')


def check_data(cfg, sections: Sequence[Tuple[str, str]], config_path: str = '') -> None:
    """Raise :class:`DataNotFoundError` listing every missing path, why it is needed and
    how to get the data set, when the data the config reads in ``sections`` is absent."""
    missing = missing_data(cfg, sections)
    if not missing:
        return
    roots = []
    for section, _ in sections:
        if section.endswith('_dataloader') and cfg.get(section):
            roots += [ds.get('data_root') for ds in _datasets(cfg[section].get('dataset'))]
    lines = [f'The data set{" of " + config_path if config_path else ""} is not where the '
             f'config expects it (paths relative to {os.getcwd()}):']
    lines += [f'  missing {what}: {path}  (read by {section})'
              for section, path, what, _ in missing]
    hints = []
    for _, path, _, kind in missing:
        hint = _hint(kind, path, roots)
        if hint not in hints:
            hints.append(hint)
    lines += hints
    lines.append(f'Or point the config at the data where it is: --cfg-options '
                 f'{missing[0][0]}.dataset.data_root=/path/... (and likewise the other data '
                 f'loaders, and an evaluator\'s ann_file).')
    raise DataNotFoundError('\n'.join(lines))


# --------------------------------------------------------------------------------------
# torch.load's safe loading and mmengine checkpoints


def _history_buffer_method(owner, name: str):
    """Stands in for ``builtins.getattr`` while unpickling an mmengine checkpoint.

    A HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``
    and so on; allowing the real ``getattr`` would let a file reach any attribute of any
    allowed object (and from there run code), so only public methods of HistoryBuffer can
    be looked up through this one."""
    from mmengine.logging.history_buffer import HistoryBuffer
    method = vars(HistoryBuffer).get(name) if owner is HistoryBuffer else None
    if name.startswith('_') or not callable(method):
        raise pickle.UnpicklingError(
            f'Refusing getattr({owner!r}, {name!r}) while loading a checkpoint: only the '
            'statistics methods of mmengine\'s HistoryBuffer can be looked up.')
    return method


def _checkpoint_globals() -> list:
    """What mmengine 0.10.7 stores in its checkpoints besides tensors and containers
    (``torch.serialization.get_unsafe_globals_in_checkpoint`` on the checkpoints of a
    detection and a segmentation run): the message hub's HistoryBuffers, their statistics
    methods (via getattr) and numpy arrays, dtypes and scalars."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    allowed = [HistoryBuffer, np.ndarray, np.dtype,
               (_history_buffer_method, 'builtins.getattr')]
    # numpy 2 writes numpy._core.multiarray, numpy 1 wrote numpy.core.multiarray.
    allowed += [(function, f'{module}.multiarray.{function.__name__}')
                for function in (_reconstruct, scalar)
                for module in ('numpy._core', 'numpy.core')]
    # Unpickled dtypes are instances of numpy's dtype classes (Float64DType, ...), whose
    # state is restored by the BUILD step only for allowed classes.
    allowed += [cls for cls in vars(getattr(np, 'dtypes', object)).values()
                if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return allowed


@contextlib.contextmanager
def checkpoint_globals():
    """Inside this block ``torch.load`` with its default ``weights_only=True`` accepts
    mmengine's own checkpoints (resume, ``load_from``, testing): only the globals of
    :func:`_checkpoint_globals` are added to what safe loading allows, and it stays on."""
    if not hasattr(torch.serialization, 'safe_globals'):  # torch < 2.5: nothing to do
        yield
        return
    with torch.serialization.safe_globals(_checkpoint_globals()):
        yield


# --------------------------------------------------------------------------------------
# Distributed runs without CUDA


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for CPU processes (gloo): no ``device_ids``, and SyncBN
    layers reverted to BatchNorm because torch's SyncBatchNorm runs on GPUs only (each
    process then normalizes with its own batch statistics)."""

    def __init__(self, module, **kwargs):
        kwargs.pop('device_ids', None)
        kwargs.pop('output_device', None)
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()):
            warnings.warn('SyncBN runs on GPUs only: on the CPU it is replaced by BatchNorm '
                          'with per-process statistics.')
            module = revert_sync_batchnorm(module)
        super().__init__(module=module, device_ids=None, **kwargs)


def _env_from_slurm() -> None:
    os.environ.setdefault('RANK', os.environ['SLURM_PROCID'])
    os.environ.setdefault('WORLD_SIZE', os.environ['SLURM_NTASKS'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0'))
    if 'MASTER_ADDR' not in os.environ:
        nodes = os.environ['SLURM_NODELIST']
        os.environ['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {nodes} | head -n1')
    os.environ.setdefault('MASTER_PORT', '29500')


def _env_from_mpi() -> None:
    os.environ.setdefault('RANK', os.environ['OMPI_COMM_WORLD_RANK'])
    os.environ.setdefault('WORLD_SIZE', os.environ['OMPI_COMM_WORLD_SIZE'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK', '0'))
    os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
    os.environ.setdefault('MASTER_PORT', '29500')


def setup_cpu_distributed(cfg, launcher: str) -> bool:
    """With a launcher but no CUDA, start the gloo process group here (mmengine's own
    start calls ``torch.cuda.set_device``) and make the Runner wrap the model in
    :class:`CPUDistributedDataParallel`. Returns whether it did; with CUDA, or with
    ``launcher='none'``, it changes nothing and mmengine proceeds as usual."""
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if launcher == 'slurm':
        _env_from_slurm()
    elif launcher == 'mpi':
        _env_from_mpi()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend='gloo', init_method='env://')
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None or wrapper.get('type', 'MMDistributedDataParallel') \
            == 'MMDistributedDataParallel':
        wrapper = dict(wrapper or {})
        wrapper['type'] = 'CPUDistributedDataParallel'
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
        cfg.model_wrapper_cfg = wrapper
    return True


def set_cpu_threads() -> None:
    """Without CUDA, use ``OMP_NUM_THREADS`` threads when it is set (torchrun sets 1 for
    each of several processes): a one-process run given the same value computes the same
    numbers as each process of a multi-process run."""
    if not torch.cuda.is_available() and os.environ.get('OMP_NUM_THREADS', '').isdigit():
        torch.set_num_threads(max(1, int(os.environ['OMP_NUM_THREADS'])))


# --------------------------------------------------------------------------------------
# What tools/train.py and tools/test.py share


def make_parser(description: str, work_dir_help: str):
    """An argument parser with the options the two tools share: ``config``,
    ``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local_rank``."""
    import argparse

    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help=f'{work_dir_help} (default: the config\'s '
                        'work_dir, else work_dirs/CONFIG_NAME)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. train_cfg.max_epochs=1 '
                             'test_dataloader.batch_size=2 (lists: key="[a,b]")')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='how the processes were started')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)
    return parser


def load_config(args):
    """The config of ``args.config`` with ``--cfg-options``, ``--launcher`` and the work
    dir applied."""
    from mmengine.config import Config
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif not cfg.get('work_dir'):
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg, args, sections):
    """Check the data (exit 2 with the message of :func:`check_data` when it is missing),
    start CPU processes when asked, and build the Runner, in the default scope (mmdet or
    mmseg) the config names."""
    import sys
    if not cfg.get('default_scope'):
        sys.exit(f'{args.config} sets no default_scope: it should inherit from an mmdet '
                 "('mmdet') or mmseg ('mmseg') base config.")
    try:
        check_data(cfg, sections, args.config)
    except DataNotFoundError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    set_cpu_threads()
    setup_cpu_distributed(cfg, args.launcher)

    import mmconvmlp  # noqa: F401  (registers ConvMLP, with or without custom_imports)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
