"""Data that exist but cannot be used: one message naming the file, or a warning with counts.

* A missing or unreadable image (or segmentation map) surfaces from mmcv's loading
  transforms as a FileNotFoundError or an assertion, in a data-loader worker wrapped in its
  traceback; a truncated annotation file as a JSON error that names no file.
  :func:`readable_data_errors` turns each into :class:`DataFileError`, which names the file.
* :class:`DataContentsHook` looks at each data set before it is used: annotations whose
  category ids are not among the config's classes (mmdet's CocoDataset leaves them out
  silently) give a warning with their counts; a data set with no samples, or a validation or
  test split without one annotation of the config's classes (the evaluation would print a
  table of -1), stops the run with :class:`DataFileError`.

:class:`~.runner.ConvMLPRunner` uses both.
"""
import json
import re
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

from mmengine.hooks import Hook
from mmengine.logging import print_log

from .data_check import _required_paths
from .readable_errors import ReadableError


class DataFileError(ReadableError, RuntimeError):
    """A file of the data set cannot be used, or nothing is left to train or evaluate on."""


_MISSING = re.compile(r"No such file or directory: '([^']+)'")
_UNDECODABLE = re.compile(r'failed to load image: (\S+)')


def _broken_json(cfg, sections: Sequence[Tuple[str, str]]) -> Optional[str]:
    """The message for the first annotation file of ``sections`` that is no valid JSON."""
    for section, _ in sections:
        if not cfg.get(section):
            continue
        for _, path, _, _ in _required_paths(section, cfg[section]):
            if not path.endswith('.json'):
                continue
            try:
                with open(path) as f:
                    json.load(f)
            except (OSError, ValueError) as error:
                return (f'{path} cannot be read as JSON ({error}): the annotation file is '
                        'damaged or cut short. Copy or download it again.')
    return None


def describe(error: Exception, cfg, sections) -> Optional[str]:
    """What :func:`readable_data_errors` says for ``error``, or None for other errors."""
    # A worker's error carries its traceback, source lines included: the last match is
    # the message.
    text = str(error)
    found = _MISSING.findall(text)
    if isinstance(error, FileNotFoundError) and found:
        return (f'{found[-1]} cannot be read: no such file. The annotations list it; '
                'put the file back, or remove its entry from the annotation file.')
    found = _UNDECODABLE.findall(text)
    if isinstance(error, AssertionError) and found:
        return (f'{found[-1]} cannot be read: it is no readable image (damaged, cut '
                'short or not an image). Replace it, or remove its entry from the '
                'annotation file.')
    if isinstance(error, json.JSONDecodeError):
        return _broken_json(cfg, sections)
    dataset = _dataset_in_traceback(error)
    if isinstance(error, ValueError) and dataset is not None \
            and 'need at least one array to concatenate' in text:
        return _no_samples(dataset)  # mmengine fails to pack an empty list of samples
    return None


def _dataset_in_traceback(error: Exception):
    """The innermost data set whose method the error went through, or None."""
    found, frame = None, error.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get('self')
        if hasattr(owner, 'ann_file') and hasattr(owner, 'full_init'):
            found = owner
        frame = frame.tb_next
    return found


def _no_samples(dataset) -> str:
    purpose = 'evaluate on' if getattr(dataset, 'test_mode', False) else 'train on'
    return (f'{_name(dataset)}: the data set holds no samples, nothing to {purpose} (no '
            'images, or none with annotations of the config\'s classes).')


@contextmanager
def readable_data_errors(cfg, sections: Sequence[Tuple[str, str]]) -> Iterator[None]:
    """Turn the data errors described in the module into :class:`DataFileError`."""
    try:
        yield
    except ReadableError:
        raise
    except Exception as error:
        message = describe(error, cfg, sections)
        if message is None:
            raise
        raise DataFileError(message) from None


def _leaf_datasets(dataset) -> Iterator:
    """The data sets inside wrappers (RepeatDataset, ConcatDataset, ...)."""
    inner = getattr(dataset, 'datasets', None) or [getattr(dataset, 'dataset', None)]
    inner = [d for d in inner if d is not None]
    if not inner:
        yield dataset
    for d in inner:
        yield from _leaf_datasets(d)


def _name(dataset) -> str:
    prefix = getattr(dataset, 'data_prefix', None) or {}
    return getattr(dataset, 'ann_file', '') or prefix.get('img_path') or prefix.get('img') \
        or type(dataset).__name__


def _has_annotations(dataset) -> bool:
    return any(dataset.get_data_info(i).get('instances') for i in range(len(dataset)))


def check_contents(dataset, purpose: str) -> None:
    """Warn about annotations left out, raise :class:`DataFileError` where nothing is left
    to ``purpose`` ('train on', 'validate on', 'test on')."""
    for leaf in _leaf_datasets(dataset):
        by_category = getattr(leaf, 'cat_img_map', None)  # category id -> one image per box
        if by_category is not None and getattr(leaf, 'cat_ids', None) is not None:
            total = sum(len(images) for images in by_category.values())
            outside = {cat: len(images) for cat, images in by_category.items()
                       if cat not in leaf.cat_ids}
            if outside:
                ids = ', '.join(str(cat) for cat in sorted(outside)[:10])
                print_log(f'{_name(leaf)}: {sum(outside.values())} of {total} annotations '
                          f'have category ids that are not among the config\'s classes '
                          f'({ids}{", ..." if len(outside) > 10 else ""}) and are left out.',
                          logger='current', level='WARNING')
        if len(leaf) == 0:
            raise DataFileError(_no_samples(leaf))
        if purpose != 'train on' and hasattr(leaf, 'cat_ids') and not _has_annotations(leaf):
            raise DataFileError(
                f'{_name(leaf)}: none of its {len(leaf)} images has an annotation of the '
                f'config\'s classes, nothing to {purpose}: the evaluation would be a table '
                'of -1. Give the annotations of this split.')


class DataContentsHook(Hook):
    """Runs :func:`check_contents` on each data set once, before it is first used."""

    priority = 'VERY_HIGH'

    def __init__(self):
        self._checked = set()

    def _check(self, loader, purpose: str) -> None:
        dataset = getattr(loader, 'dataset', None)
        if dataset is not None and id(dataset) not in self._checked:
            self._checked.add(id(dataset))
            check_contents(dataset, purpose)

    def before_train(self, runner) -> None:
        self._check(runner.train_dataloader, 'train on')

    def before_val(self, runner) -> None:
        self._check(runner.val_dataloader, 'validate on')

    def before_test(self, runner) -> None:
        self._check(runner.test_dataloader, 'test on')
