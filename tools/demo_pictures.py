"""Pictures of a detector trained on the shapes demo data: predictions on validation images and
the training curves (loss and COCO mAP), as PNG files.

    python tools/demo_pictures.py CONFIG WORK_DIR [--checkpoint PTH] [--out DIR] [--device D]

WORK_DIR is the ``--work-dir`` of ``tools/train.py``: the curves come from the newest
``*/vis_data/scalars.json`` inside it and the checkpoint, unless given, from its
``last_checkpoint``. The predictions are made and drawn as ``tools/infer.py`` does it, on the
GPU when there is one. Prints the paths of the pictures it writes.
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # tools/infer.py

SCALE = 2          # validation images are small: draw them bigger
SCORE_THR = 0.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('work_dir')
    parser.add_argument('--checkpoint', help='default: the last checkpoint in WORK_DIR')
    parser.add_argument('--out', help='output folder (default: WORK_DIR/pictures)')
    parser.add_argument('--num-images', type=int, default=12)
    parser.add_argument('--score-thr', type=float, default=SCORE_THR)
    parser.add_argument('--device', help='default: cuda if available, else cpu')
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Training curves

def read_scalars(work_dir):
    """Training records and validation records of the newest run in ``work_dir``."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')),
                   key=osp.getmtime)
    if not files:
        raise FileNotFoundError(f'no */vis_data/scalars.json under {work_dir}')
    train, val = [], []
    with open(files[-1]) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            (train if 'loss' in record else val).append(record)
    return train, val


def plot_curves(work_dir, out_file):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    train, val = read_scalars(work_dir)
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.array([r['step'] for r in train])
    losses = sorted({k for r in train for k in r if k.startswith('loss')},
                    key=lambda k: (k != 'loss', k))
    for key in losses:
        values = np.array([r.get(key, np.nan) for r in train])
        ax_loss.plot(steps, values, label=key, lw=2 if key == 'loss' else 1)
    ax_loss.set_xlabel('iteration')
    ax_loss.set_ylabel('training loss (logged average)')
    ax_loss.set_yscale('log')
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_loss.set_title('training loss')

    # Validation records are stepped by epoch in epoch-based loops: put each at the last
    # logged iteration of its epoch. Iteration-based loops step them by iteration.
    last_iter_of_epoch = defaultdict(int)
    for r in train:
        if 'epoch' in r:
            last_iter_of_epoch[r['epoch']] = max(last_iter_of_epoch[r['epoch']], r['iter'])
    keys = [k for k in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75',
                        'coco/segm_mAP', 'mIoU', 'aAcc') if any(k in r for r in val)]
    for key in keys:
        pts = [(r['step'], r[key]) for r in val if key in r]
        x = np.array([last_iter_of_epoch.get(p[0], p[0]) if last_iter_of_epoch else p[0]
                      for p in pts], float)
        y = np.array([p[1] for p in pts], float)
        if key in ('mIoU', 'aAcc'):
            y = y / 100
        ax_map.plot(x, y, 'o-', label=key, lw=2 if key in ('coco/bbox_mAP', 'mIoU') else 1)
    ax_map.set_xlim(left=0)
    ax_map.set_ylim(0, 1)
    ax_map.set_xlabel('iteration')
    ax_map.set_ylabel('validation score')
    ax_map.grid(alpha=0.3)
    ax_map.legend(fontsize=8)
    ax_map.set_title('validation (COCO mAP @ IoU 0.5:0.95 and others)')
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


# ----------------------------------------------------------------------------------------
# Predictions


def ground_truth(data_info: dict, with_masks: bool):
    """The annotated objects of one image of an mmdet dataset (``get_data_info``) as the
    ``gt_instances`` mmdet's visualizer draws: boxes (x1, y1, x2, y2), labels and, with
    ``with_masks``, polygon masks."""
    import torch
    from mmdet.structures.mask import PolygonMasks
    from mmengine.structures import InstanceData
    objects = [o for o in data_info['instances'] if not o.get('ignore_flag', 0)]
    gt = InstanceData(bboxes=torch.tensor([o['bbox'] for o in objects],
                                          dtype=torch.float32).reshape(-1, 4),
                      labels=torch.tensor([o['bbox_label'] for o in objects], dtype=torch.long))
    if with_masks:
        gt.masks = PolygonMasks([o['mask'] for o in objects], data_info['height'],
                                data_info['width'])
    return gt


def enlarge(image: np.ndarray, sample, factor: int):
    """``image`` and the boxes and masks of ``sample`` (predictions and ground truth)
    ``factor`` times larger, pixels repeated: the visualizer's labels then fit small images."""
    image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    for instances in (sample.pred_instances, sample.gt_instances):
        instances.bboxes = instances.bboxes * factor
        if 'masks' not in instances:
            continue
        if hasattr(instances.masks, 'rescale'):  # PolygonMasks of the ground truth
            instances.masks = instances.masks.rescale(factor)
        else:  # (N, H, W) tensor of the predictions
            instances.masks = instances.masks.repeat_interleave(factor, 1) \
                .repeat_interleave(factor, 2)
    return image, sample


def grid(pictures, columns: int = 2, gap: int = 12) -> np.ndarray:
    """The (H, W, 3) pictures in rows of ``columns``, on white, ``gap`` pixels apart."""
    height = max(p.shape[0] for p in pictures)
    width = max(p.shape[1] for p in pictures)
    rows = (len(pictures) + columns - 1) // columns
    sheet = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255,
                    np.uint8)
    for i, picture in enumerate(pictures):
        y, x = (i // columns) * (height + gap), (i % columns) * (width + gap)
        sheet[y:y + picture.shape[0], x:x + picture.shape[1]] = picture
    return sheet


def draw_predictions(config, checkpoint, out_file, num_images=12, score_thr=SCORE_THR,
                     device=None):
    """Ground truth beside the predictions for the first validation images, in one grid.

    The model runs and the pictures are drawn as ``tools/infer.py`` does it (mmdet's
    ``DetInferencer`` and ``DetLocalVisualizer``), each image :data:`SCALE` times larger."""
    import mmcv
    from mmdet.registry import DATASETS
    from infer import build_inferencer, default_device, draw, predict, read_image

    inferencer = build_inferencer(config, checkpoint, device or default_device())
    dataset = DATASETS.build(inferencer.cfg.val_dataloader.dataset)
    pictures = []
    for index in range(min(num_images, len(dataset))):
        info = dataset.get_data_info(index)
        image = read_image(info['img_path'])
        sample = predict(inferencer, image)
        sample.gt_instances = ground_truth(info, 'masks' in sample.pred_instances)
        image, sample = enlarge(image, sample, SCALE)
        pictures.append(draw(inferencer, image, sample, score_thr, draw_gt=True))
    mmcv.imwrite(grid(pictures)[..., ::-1], out_file)
    return out_file


def last_checkpoint(work_dir):
    marker = osp.join(work_dir, 'last_checkpoint')
    if osp.exists(marker):
        with open(marker) as f:
            path = f.read().strip()
        if osp.exists(path):
            return path
        if osp.exists(osp.join(work_dir, osp.basename(path))):
            return osp.join(work_dir, osp.basename(path))
    found = sorted(glob.glob(osp.join(work_dir, '*.pth')), key=osp.getmtime)
    if not found:
        raise FileNotFoundError(f'no checkpoint in {work_dir}')
    return found[-1]


def main(argv=None):
    args = parse_args(argv)
    out = args.out or osp.join(args.work_dir, 'pictures')
    os.makedirs(out, exist_ok=True)
    checkpoint = args.checkpoint or last_checkpoint(args.work_dir)
    curves = plot_curves(args.work_dir, osp.join(out, 'training_curves.png'))
    preds = draw_predictions(args.config, checkpoint, osp.join(out, 'val_predictions.png'),
                             args.num_images, args.score_thr, args.device)
    print(f'training curves (loss, validation mAP): {curves}')
    print(f'predictions on validation images:       {preds}')


if __name__ == '__main__':
    from mmconvmlp.engine import install_excepthook
    install_excepthook()  # mmconvmlp's readable errors print without a traceback
    main()
