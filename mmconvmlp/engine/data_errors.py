"""Data that exist but cannot be used: one message naming the file, or a warning with counts.

* A missing or unreadable image (or segmentation map) surfaces from mmcv's loading
  transforms as a FileNotFoundError or an assertion, in a data-loader worker wrapped in its
  traceback; a truncated annotation file as a JSON error that names no file; a label map of
  another size than its image, or with labels the config has no class for, as a bare
  RuntimeError or IndexError in the loss or the metric. :func:`readable_data_errors` turns
  each into :class:`DataFileError`, which names the file (for label maps: the one of the
  failing batch that is wrong, and how).
* :class:`DataContentsHook` looks at each data set before it is used. mmdet's CocoDataset
  and LoadAnnotations leave out without a word annotations whose category ids are not among
  the config's classes, boxes under a pixel wide or high or wholly outside their image, and
  polygons with an odd number of coordinates or fewer than 3 points: each gives a warning
  with counts, as do boxes reaching outside their image (kept). An image listed twice, a
  data set with no samples, or a validation or test split without one annotation of the
  config's classes (the evaluation would print a table of -1) stops the run with
  :class:`DataFileError`.

:class:`~.runner.ConvMLPRunner` uses both.
"""
import json
import logging
import os.path as osp
import re
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from mmengine.dist import get_rank
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
    if isinstance(error, (RuntimeError, IndexError, ValueError)):
        return _wrong_label_map(error, cfg)
    return None


def _num_classes(cfg) -> Optional[int]:
    """The class count of a segmentor config's decode head, or None."""
    head = (cfg.get('model') or {}).get('decode_head')
    head = head[-1] if isinstance(head, (list, tuple)) and head else head
    return head.get('num_classes') if isinstance(head, dict) else None


def _wrong_label_map(error: Exception, cfg) -> Optional[str]:
    """What is wrong with a label map of the batch the error went through (the training or
    validation loop's ``data_batch``): another size than its image, or a label the config
    has no class for (other than 255, ignored). None when they are all sound."""
    batch, frame = None, error.__traceback__
    while frame is not None:
        found = frame.tb_frame.f_locals.get('data_batch')
        if isinstance(found, dict) and found.get('data_samples'):
            batch = found
        frame = frame.tb_next
    if batch is None:
        return None
    for sample in batch['data_samples']:
        meta = getattr(sample, 'metainfo', {})
        problem = label_map_problem(meta.get('seg_map_path'), meta.get('img_path'),
                                    _num_classes(cfg), bool(meta.get('reduce_zero_label')))
        if problem:
            return problem
    return None


def label_map_problem(seg_map: Optional[str], image: Optional[str],
                      num_classes: Optional[int], reduce_zero_label: bool) -> Optional[str]:
    """What is wrong with the label map ``seg_map`` of ``image``, read as mmseg's
    LoadAnnotations reads it, or None."""
    from PIL import Image
    if not seg_map or not image or not osp.isfile(seg_map) or not osp.isfile(image):
        return None
    with Image.open(seg_map) as opened:
        labels = np.asarray(opened)
    with Image.open(image) as opened:
        width, height = opened.size
    if labels.shape[:2] != (height, width):
        return (f'{seg_map}: its label map is {labels.shape[1]}x{labels.shape[0]} pixels, '
                f'but its image {image} is {width}x{height}. A label map must have the size '
                'of its image: fix it, or remove the pair from the data set.')
    labels = labels.astype(np.int64)
    if reduce_zero_label:  # as LoadAnnotations: 0 -> 255 (ignored), the others minus 1
        labels = np.where(labels == 0, 255, labels - 1)
        labels[labels == 254] = 255
    if num_classes is None:
        return None
    beyond = np.unique(labels[(labels >= num_classes) & (labels != 255)])
    if beyond.size == 0:
        return None
    shown = ', '.join(str(v) for v in beyond[:8].tolist()) + (', ...' if beyond.size > 8 else '')
    shift = ' (after reduce_zero_label subtracts 1)' if reduce_zero_label else ''
    return (f'{seg_map} holds labels {shown}{shift}, but the config has {num_classes} classes: '
            f'labels 0-{num_classes - 1}, and 255 for pixels to ignore. Fix the label map, or '
            'the num_classes of the config\'s decode head.')


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


def _warn(text: str) -> None:
    print_log(text, logger='current', level=logging.WARNING)


def check_categories(leaf) -> None:
    """Warn about annotations whose category ids are not among the config's classes."""
    by_category = getattr(leaf, 'cat_img_map', None)  # category id -> one image per box
    if by_category is None or getattr(leaf, 'cat_ids', None) is None:
        return
    total = sum(len(images) for images in by_category.values())
    outside = {cat: len(images) for cat, images in by_category.items()
               if cat not in leaf.cat_ids}
    if outside:
        ids = ', '.join(str(cat) for cat in sorted(outside)[:10])
        _warn(f'{_name(leaf)}: {sum(outside.values())} of {total} annotations have category '
              f'ids that are not among the config\'s classes ({ids}'
              f'{", ..." if len(outside) > 10 else ""}) and are left out.')


def check_boxes(leaf) -> None:
    """Warn, with counts read from the COCO-style annotation file itself, about the boxes
    CocoDataset leaves out without a word (under a pixel wide or high, of area 0, or wholly
    outside their image) and about those reaching more than a pixel outside it (kept)."""
    path = getattr(leaf, 'ann_file', '') or ''
    if not path.endswith('.json') or not osp.isfile(path):
        return
    with open(path) as f:
        coco = json.load(f)
    sizes = {image.get('id'): (image.get('width'), image.get('height'))
             for image in coco.get('images', [])}
    tiny: List[int] = []
    outside: List[int] = []
    beyond: List[int] = []
    total = 0
    for ann in coco.get('annotations', []):
        if ann.get('ignore') or not isinstance(ann.get('bbox'), list) \
                or len(ann['bbox']) != 4:
            continue
        total += 1
        x, y, w, h = ann['bbox']
        width, height = sizes.get(ann.get('image_id'), (None, None))
        if width is None or height is None:
            continue
        if w < 1 or h < 1 or ann.get('area', 1) <= 0:
            tiny.append(ann.get('id'))
        elif max(0, min(x + w, width) - max(x, 0)) * max(0, min(y + h, height) - max(y, 0)) == 0:
            outside.append(ann.get('id'))
        elif x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            beyond.append(ann.get('id'))
    if tiny or outside:
        example = (tiny or outside)[0]
        _warn(f'{_name(leaf)}: {len(tiny)} of {total} boxes are under a pixel wide or high '
              f'(or of area 0) and {len(outside)} lie wholly outside their image (e.g. '
              f'annotation id {example}): mmdet leaves them out.')
    if beyond:
        _warn(f'{_name(leaf)}: {len(beyond)} of {total} boxes reach more than a pixel outside '
              f'their image (e.g. annotation id {beyond[0]}); they are kept as given.')


def _loads_masks(leaf) -> bool:
    transforms = getattr(getattr(leaf, 'pipeline', None), 'transforms', None) or []
    return any(getattr(transform, 'with_mask', False) for transform in transforms)


def check_images_and_polygons(leaf) -> None:
    """Stop at an image listed more than once; warn about the polygons mmdet's
    LoadAnnotations leaves out (odd coordinate counts, fewer than 3 points) and the
    instances that keep none, when the pipeline loads masks."""
    paths: Counter = Counter()
    polygons = bad = ignored = 0
    example = None
    with_masks = _loads_masks(leaf)
    for i in range(len(leaf)):
        info = leaf.get_data_info(i)
        paths[info.get('img_path')] += 1
        for instance in info.get('instances', []) if with_masks else ():
            mask = instance.get('mask')
            if not isinstance(mask, list):
                continue
            invalid = [p for p in mask if not isinstance(p, list) or len(p) % 2 or len(p) < 6]
            polygons += len(mask)
            bad += len(invalid)
            ignored += len(invalid) == len(mask)
            example = example or (invalid and info.get('img_path'))
    repeated = {path: n for path, n in paths.items() if path is not None and n > 1}
    if repeated:
        path, times = next(iter(repeated.items()))
        raise DataFileError(
            f'{_name(leaf)}: {len(repeated)} images are listed more than once (e.g. {path}, '
            f'{times} times): training would see them more often than the others, and '
            'evaluation would count them twice. Remove the extra entries from the '
            'annotation file.')
    if bad:
        _warn(f'{_name(leaf)}: {bad} of {polygons} polygons have an odd number of '
              f'coordinates or fewer than 3 points (e.g. in {example}), which mmdet\'s '
              f'LoadAnnotations leaves out; {ignored} instances keep no polygon and are '
              'ignored.')


def check_contents(dataset, purpose: str) -> None:
    """Warn about annotations left out, raise :class:`DataFileError` for an image listed
    twice or where nothing is left to ``purpose`` ('train on', 'validate on', 'test on')."""
    for leaf in _leaf_datasets(dataset):
        check_categories(leaf)
        if get_rank() == 0:  # counts read again from the file, for warnings only
            check_boxes(leaf)
        if len(leaf) == 0:
            raise DataFileError(_no_samples(leaf))
        if hasattr(leaf, 'get_data_info'):  # an mmengine data set
            check_images_and_polygons(leaf)
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
