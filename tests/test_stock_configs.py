"""README's table of stock mmdet/mmseg configs with ConvMLP: each row's config, its backbone
replaced as the README shows and the row's settings applied, builds and trains a step.

Every row is built with ConvMLP-S and ConvMLP-L (with the settings of their columns) and
trains one step, on two 64x64 images, with the one of the two the row's position picks, so
both columns train and the whole file stays well within a minute on 2 cores."""
import ast
import math
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

from mmconvmlp.config_models import build_config_model, resolve_config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SIZE = 64


def readme_table():
    """``[(model, stock config, settings for S and M, settings for L)]`` from the README's
    table under 'Stock configs with ConvMLP'; settings are ``{dotted key: value}``."""
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    section = text.split('### Stock configs with ConvMLP', 1)[1].split('\n#', 1)[0]
    rows = []
    for line in section.splitlines():
        found = re.match(r'\| ([^|]+) \| `((?:mmdet|mmseg)::[^`]+)` \|([^|]+)\|([^|]+)\|', line)
        if found:
            model, config, small, large = found.groups()
            rows.append((model.strip(), config, settings(small), settings(large)))
    return rows


def settings(cell):
    """``{'neck.in_channels': [64, 128, 256, 512], ...}`` from a cell of backticked
    ``key=value`` items."""
    items = re.findall(r'`([\w.]+)=([^`]+)`', cell)
    assert items, cell
    return {key: ast.literal_eval(value) for key, value in items}


ROWS = readme_table()


def test_the_table_covers_the_common_stock_models():
    assert [model for model, *_ in ROWS] == [
        'FCOS', 'ATSS', 'GFL', 'Faster R-CNN', 'Cascade Mask R-CNN', 'RTMDet', 'DETR',
        'Deformable DETR', 'Mask2Former (mmdet)', 'UPerNet', 'DeepLabV3+', 'SegFormer',
        'Mask2Former (mmseg)']


def convmlp_config(stock, arch, changes):
    """The stock config with ``backbone=dict(_delete_=True, type='ConvMLP', arch=arch)`` and
    the row's settings, as a user writes them (mmseg's stock ``model.pretrained``, ResNet's
    weights, stays: ConvMLP ignores it); plus what only makes this test small."""
    cfg = Config.fromfile(resolve_config(stock))
    cfg.model.backbone = ConfigDict(type='ConvMLP', arch=arch)
    for key, value in changes.items():
        *parents, last = key.split('.')
        node = cfg.model
        for parent in parents:
            node = node[parent]
        node[last] = value
    if cfg.default_scope == 'mmseg':
        cfg.model.data_preprocessor.size = (SIZE, SIZE)  # pads to the 512x512 crop otherwise
    cfg.model.data_preprocessor.pop('batch_augments', None)  # Mask2Former: pads to 1024x1024
    return cfg


def training_batch(cfg):
    """Two random images with random boxes (and masks, for models with a mask head) or
    label maps."""
    if cfg.default_scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        masks = 'mask_head' in cfg.model.get('roi_head', {}) or 'panoptic_head' in cfg.model
        return demo_mm_inputs(2, [[3, SIZE, SIZE]] * 2, num_items=[3, 2],
                              num_classes=num_classes(cfg), with_mask=masks)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    meta = dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE))
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=meta)
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes(cfg),
                                                         (1, SIZE, SIZE)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8)
                        for _ in range(2)], data_samples=samples)


def num_classes(cfg):
    model = cfg.model
    for head in ('bbox_head', 'panoptic_head', 'decode_head'):
        if head in model:
            return model[head].get('num_classes', model[head].get('num_things_classes'))
    return model.roi_head.bbox_head[0].num_classes if isinstance(
        model.roi_head.bbox_head, list) else model.roi_head.bbox_head.num_classes


@pytest.mark.parametrize('index', range(len(ROWS)), ids=[row[0] for row in ROWS])
def test_stock_config_with_convmlp_builds_and_trains(index):
    model_name, stock, small, large = ROWS[index]
    train_arch = 'sl'[index % 2]
    for arch, changes in (('s', small), ('l', large)):
        cfg = convmlp_config(stock, arch, changes)
        model = revert_sync_batchnorm(build_config_model(cfg))
        if arch != train_arch:
            continue
        model.init_weights()
        model.train()
        optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
        before = [p.detach().clone() for p in model.backbone.parameters()]
        with DefaultScope.overwrite_default_scope(cfg.default_scope):
            losses = model.train_step(training_batch(cfg), optim)
        assert losses and all(math.isfinite(float(v)) for v in losses.values()), losses
        changed = [not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters())]
        assert any(changed), f'{model_name}: the step did not train the ConvMLP backbone'
