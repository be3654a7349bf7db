"""Stop with a readable message when the data a config reads is absent.

:func:`check_data` lists every missing annotation file and image folder of the data
loaders and evaluators a run uses, says where each data set comes from and how to point
the config elsewhere. :class:`~mmconvmlp.engine.runner.ConvMLPRunner` calls it before
training, validating or testing.
"""
import os
import os.path as osp
from typing import Dict, Iterator, List, Sequence, Tuple

from .readable_errors import ReadableError


class DataNotFoundError(ReadableError, FileNotFoundError):
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

#: The config sections that training, validation and testing read data through, each
#: with the loop config that puts it in use.
VAL_SECTIONS = (('val_dataloader', 'val_cfg'), ('val_evaluator', 'val_cfg'))
TRAIN_SECTIONS = (('train_dataloader', 'train_cfg'), *VAL_SECTIONS)
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
