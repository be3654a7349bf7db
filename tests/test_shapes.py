"""The shapes demo data set (mmconvmlp.datasets.shapes) and the demo configs built on it."""
import filecmp
import json
import os
import os.path as osp
import sys

import numpy as np
import pytest
from PIL import Image

from mmconvmlp.datasets import DEFAULT_CLASSES, mask_to_polygons, write_shapes_dataset
from mmconvmlp.datasets.shapes import ADE_OTHER, rasterize, render_image, shape_polygon

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIGS = {
    'retinanet': 'configs/detection/retinanet_convmlp_s_shapes.py',
    'mask_rcnn': 'configs/detection/mask_rcnn_convmlp_s_shapes.py',
    'fpn': 'configs/segmentation/fpn_convmlp_s_shapes.py',
}
SIZE = 96


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    write_shapes_dataset(root, num_train=8, num_val=4, image_size=SIZE, seed=3)
    return root


def _files(root):
    return sorted(osp.relpath(osp.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


def _coco(root, split='train'):
    from pycocotools.coco import COCO
    return COCO(osp.join(root, 'coco', 'annotations', f'instances_{split}2017.json'))


def _decode(ann, height, width):
    from pycocotools import mask as mask_utils
    rle = mask_utils.merge(mask_utils.frPyObjects(ann['segmentation'], height, width))
    return mask_utils.decode(rle).astype(bool)


def test_same_seed_same_files_other_seed_other_images(shapes_root, tmp_path):
    again = str(tmp_path / 'again')
    write_shapes_dataset(again, num_train=8, num_val=4, image_size=SIZE, seed=3)
    files = _files(shapes_root)
    assert files == _files(again)
    assert len([f for f in files if f.startswith('coco/train2017/')]) == 8
    assert len([f for f in files if f.startswith('coco/val2017/')]) == 4
    match, mismatch, errors = filecmp.cmpfiles(shapes_root, again, files, shallow=False)
    assert not mismatch and not errors

    other = str(tmp_path / 'other')
    write_shapes_dataset(other, num_train=2, num_val=1, image_size=SIZE, seed=4)
    first = 'coco/train2017/000000000001.jpg'
    assert not filecmp.cmp(osp.join(shapes_root, first), osp.join(other, first), shallow=False)
    # Each image has its own seed: fewer images give the same first images.
    fewer = str(tmp_path / 'fewer')
    write_shapes_dataset(fewer, num_train=2, num_val=1, image_size=SIZE, seed=3)
    assert filecmp.cmp(osp.join(shapes_root, first), osp.join(fewer, first), shallow=False)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_coco_annotations_are_valid_and_match_the_masks(shapes_root, split):
    coco = _coco(shapes_root, split)
    cats = coco.loadCats(coco.getCatIds())
    assert [(c['id'], c['name']) for c in cats] == list(enumerate(DEFAULT_CLASSES, start=1))
    assert len(coco.getImgIds()) == (8 if split == 'train' else 4)
    seen_categories, occluding, cut = set(), 0, 0
    for image in coco.loadImgs(coco.getImgIds()):
        h, w = image['height'], image['width']
        assert (h, w) == (SIZE, SIZE)
        path = osp.join(shapes_root, 'coco', f'{split}2017', image['file_name'])
        assert Image.open(path).size == (w, h)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image['id']]))
        assert len(anns) >= 1
        union = np.zeros((h, w), int)
        masks = []
        for ann in anns:
            assert ann['iscrowd'] == 0
            x, y, bw, bh = ann['bbox']
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann['segmentation'])
            mask = _decode(ann, h, w)
            assert mask.sum() == ann['area'] > 0
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == \
                ann['bbox']
            union += mask
            masks.append(mask)
            seen_categories.add(ann['category_id'])
            cut += xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1
        # Visible regions never share a pixel; where one shape hides part of another, their
        # regions touch (a pixel of one next to a pixel of the other).
        assert union.max() == 1
        occluding += any(_touch(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])
    assert len(seen_categories) >= 3
    assert cut > 0
    # Shapes hide parts of others in half of the images or more (with min_visible=1.0,
    # which allows no hiding, only shapes that happen to touch remain: 3 of 8 and 0 of 4).
    assert occluding >= len(coco.getImgIds()) / 2


def _touch(a, b):
    """Whether a pixel of mask ``a`` is next to (4-neighbourhood) a pixel of mask ``b``."""
    grown = a.copy()
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())


def test_ade_labels_match_the_coco_masks(shapes_root):
    coco = _coco(shapes_root, 'train')
    ade = osp.join(shapes_root, 'ade', 'ADEChallengeData2016')
    for image in coco.loadImgs(coco.getImgIds()):
        name = f'ADE_train_{image["id"]:08d}'
        labels = np.asarray(Image.open(osp.join(ade, 'annotations', 'training', name + '.png')))
        assert labels.dtype == np.uint8 and labels.shape == (SIZE, SIZE)
        assert labels.max() <= 1 + len(DEFAULT_CLASSES)
        assert (labels == 1).any()             # background
        expected = np.full(labels.shape, -1)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image['id']])):
            expected[_decode(ann, SIZE, SIZE)] = ann['category_id'] + 1
        shapes = expected >= 0
        assert np.array_equal(labels[shapes], expected[shapes])
        assert (labels[~shapes] <= 1).all()      # 0 "other" strokes, 1 background
        # The same picture in both layouts.
        coco_img = Image.open(osp.join(shapes_root, 'coco', 'train2017', image['file_name']))
        ade_img = Image.open(osp.join(ade, 'images', 'training', name + '.jpg'))
        assert np.array_equal(np.asarray(coco_img), np.asarray(ade_img))
    assert len(os.listdir(osp.join(ade, 'images', 'validation'))) == 4


def test_polygons_of_a_mask_give_back_the_mask():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    for kind in ('circle', 'triangle', 'square', 'star', 'cross', 'hexagon'):
        mask = rasterize(shape_polygon(kind, 20, 18, rng.uniform(6, 40), rng.uniform(0, 6)),
                         40, 40)
        # Two parts, one of them touching the first only at a corner.
        mask[30:34, 30:34] = True
        mask[34:37, 34:37] = True
        polygons, holes = mask_to_polygons(mask)
        assert holes == 0 and len(polygons) >= 2
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, 40, 40))
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert mask_to_polygons(ring)[1] == 1


def test_difficulty_settings():
    """The number of strokes and the shape sizes follow the keyword arguments."""
    def render(seed, **kwargs):
        return render_image(np.random.default_rng(seed), 96, 4, DEFAULT_CLASSES,
                            max_objects=3, **kwargs)
    for seed in range(6):
        _, labels, _ = render(seed, max_strokes=0)
        assert not (labels == ADE_OTHER).any()
        _, labels, objects = render(seed, max_strokes=9, min_size=0.4, max_size=0.5,
                                    min_visible=0.9)
        assert (labels == ADE_OTHER).any()
        for obj in objects:
            # A shape of size s spans at least ~0.78 s in its longest direction (a squat
            # triangle), minus what little of it may be hidden, unless the border cuts it.
            x, y, w, h = obj['bbox']
            cut = x == 0 or y == 0 or x + w == 96 or y + h == 96
            assert cut or max(w, h) >= 0.4 * 96 * 0.7


def test_other_class_names_and_the_cli(tmp_path):
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        import make_shapes_dataset
    finally:
        sys.path.pop(0)
    out = str(tmp_path / 'cli')
    make_shapes_dataset.main(['--out', out, '--num-train', '2', '--num-val', '1',
                              '--image-size', '64', '--seed', '1',
                              '--classes', 'person', 'car', 'dog'])
    with open(osp.join(out, 'coco', 'annotations', 'instances_val2017.json')) as f:
        data = json.load(f)
    assert [c['name'] for c in data['categories']] == ['person', 'car', 'dog']
    assert {a['category_id'] for a in data['annotations']} <= {1, 2, 3}
    with pytest.raises(ValueError):
        write_shapes_dataset(str(tmp_path / 'x'), num_train=1, num_val=1,
                             class_names=tuple(f'c{i}' for i in range(7)))


def _demo_config(name, root):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, DEMO_CONFIGS[name]))
    if name == 'fpn':
        new_root = osp.join(root, 'ade', 'ADEChallengeData2016')
    else:
        new_root = osp.join(root, 'coco') + '/'
        cfg.val_evaluator.ann_file = new_root + 'annotations/instances_val2017.json'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = new_root
    return cfg


@pytest.mark.parametrize('name', ['retinanet', 'mask_rcnn'])
def test_the_demo_detection_data_loads_through_cocodataset(shapes_root, name):
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = _demo_config(name, shapes_root)
    coco = _coco(shapes_root, 'train')
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert dataset.metainfo['classes'] == DEFAULT_CLASSES
    assert len(dataset) == 8
    sample = dataset[0]['data_samples']
    img_id = sample.img_id
    assert len(sample.gt_instances) == len(coco.getAnnIds(imgIds=[img_id]))
    assert sample.gt_instances.labels.max() < len(DEFAULT_CLASSES)
    if name == 'mask_rcnn':
        assert sample.gt_instances.masks.masks.shape[1:] == (SIZE, SIZE)
    val = DATASETS.build(cfg.val_dataloader.dataset)
    assert len(val) == 4


def test_the_demo_segmentation_data_loads(shapes_root):
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules
    register_all_modules()
    cfg = _demo_config('fpn', shapes_root)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(dataset) == 8
    assert dataset.metainfo['classes'][0] == 'background'
    seg = dataset[0]['data_samples'].gt_sem_seg.data.numpy()
    values = set(np.unique(seg).tolist())
    # reduce_zero_label: 0 "other" -> 255 (ignored), 1 background -> 0, shapes -> 1..
    assert values <= set(range(len(DEFAULT_CLASSES) + 1)) | {255}
    assert 0 in values and values - {0, 255}


@pytest.mark.parametrize('name', sorted(DEMO_CONFIGS))
def test_the_demo_configs_build_without_downloads(name):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, DEMO_CONFIGS[name]))
    assert cfg.model.backbone.type == 'ConvMLP' and cfg.model.backbone.arch == 's'
    assert cfg.model.backbone.init_cfg is None
    assert cfg.model.get('pretrained') is None and cfg.get('load_from') is None
    if name == 'fpn':
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
        assert cfg.model.decode_head.num_classes == 5
    else:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    register_all_modules()
    import mmconvmlp  # noqa: F401
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert model.backbone.out_channels == (64, 128, 256, 512)
    heads = {'retinanet': lambda m: m.bbox_head.num_classes,
             'mask_rcnn': lambda m: m.roi_head.bbox_head.num_classes,
             'fpn': lambda m: m.decode_head.num_classes}
    assert heads[name](model) == (5 if name == 'fpn' else 4)


def test_the_demo_plots_the_training_curves(tmp_path):
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        import demo_pictures
    finally:
        sys.path.pop(0)
    run = tmp_path / 'work' / '20260101_000000' / 'vis_data'
    run.mkdir(parents=True)
    records = []
    for epoch in (1, 2):
        for it in (5, 10):
            step = (epoch - 1) * 10 + it
            records.append(dict(loss=2.0 / step, loss_cls=1.0 / step, loss_bbox=1.0 / step,
                                lr=1e-4, epoch=epoch, iter=step, step=step))
        records.append({'coco/bbox_mAP': 0.1 * epoch, 'coco/bbox_mAP_50': 0.2 * epoch,
                        'step': epoch})
    (run / 'scalars.json').write_text('\n'.join(json.dumps(r) for r in records) + '\n')
    train, val = demo_pictures.read_scalars(str(tmp_path / 'work'))
    assert len(train) == 4 and len(val) == 2
    out = demo_pictures.plot_curves(str(tmp_path / 'work'), str(tmp_path / 'curves.png'))
    with Image.open(out) as image:
        assert image.size[0] > 500 and image.size[1] > 200
