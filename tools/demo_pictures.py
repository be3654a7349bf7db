"""Pictures of a detector trained on the shapes demo data: predictions on validation images and
the training curves (loss and COCO mAP), as PNG files.

    python tools/demo_pictures.py CONFIG WORK_DIR [--checkpoint PTH] [--out DIR]

WORK_DIR is the ``--work-dir`` of ``tools/train.py``: the curves come from the newest
``*/vis_data/scalars.json`` inside it and the checkpoint, unless given, from its
``last_checkpoint``. Prints the paths of the pictures it writes.
"""
import argparse
import glob
import json
import os
import os.path as osp
from collections import defaultdict

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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

def _colour(label):
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
               (245, 130, 48), (70, 240, 240), (240, 50, 230)]
    return palette[label % len(palette)]


def _label(draw, xy, text, colour, font):
    x, y = xy
    box = draw.textbbox((x, y), text, font=font)
    draw.rectangle(box, fill=colour)
    draw.text((x, y), text, fill=(0, 0, 0), font=font)


def draw_predictions(config, checkpoint, out_file, num_images=12, score_thr=SCORE_THR):
    """Ground truth beside predictions for the first validation images, in one grid."""
    from mmdet.apis import inference_detector, init_detector
    from mmengine.config import Config
    from pycocotools.coco import COCO

    import mmconvmlp  # noqa: F401  (registers ConvMLP)
    from mmconvmlp.runner_utils import checkpoint_globals

    cfg = Config.fromfile(config)
    dataset = cfg.val_dataloader.dataset
    coco = COCO(osp.join(dataset.data_root, dataset.ann_file))
    img_dir = osp.join(dataset.data_root, dataset.data_prefix['img'])
    classes = list(dataset.metainfo['classes'])
    # mmengine checkpoints hold more than tensors: allow those classes to torch's safe loading.
    with checkpoint_globals():
        model = init_detector(cfg, checkpoint, device='cpu')
    font = ImageFont.load_default()

    tiles = []
    image_ids = sorted(coco.getImgIds())[:num_images]
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        path = osp.join(img_dir, info['file_name'])
        image = Image.open(path).convert('RGB')
        size = (image.width * SCALE, image.height * SCALE)
        gt = image.resize(size, Image.NEAREST)
        draw = ImageDraw.Draw(gt)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            x, y, w, h = [v * SCALE for v in ann['bbox']]
            name = coco.loadCats(ann['category_id'])[0]['name']
            colour = _colour(classes.index(name) if name in classes else 0)
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
            _label(draw, (x + 2, y + 2), name, colour, font)

        result = inference_detector(model, path).pred_instances
        keep = result.scores >= score_thr
        pred = image.resize(size, Image.NEAREST)
        if 'masks' in result and keep.any():
            overlay = np.asarray(pred).astype(np.float32)
            for mask, label in zip(result.masks[keep].numpy(), result.labels[keep].tolist()):
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size,
                                                                               Image.NEAREST),
                                  bool)
                overlay[mask] = 0.5 * overlay[mask] + 0.5 * np.array(_colour(label))
            pred = Image.fromarray(overlay.astype(np.uint8))
        draw = ImageDraw.Draw(pred)
        for box, score, label in zip(result.bboxes[keep].tolist(), result.scores[keep].tolist(),
                                     result.labels[keep].tolist()):
            x0, y0, x1, y1 = [v * SCALE for v in box]
            colour = _colour(label)
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
            _label(draw, (x0 + 2, y0 + 2), f'{classes[label]} {score:.2f}', colour, font)
        pair = Image.new('RGB', (size[0] * 2 + 6, size[1] + 16), (255, 255, 255))
        pair.paste(gt, (0, 16))
        pair.paste(pred, (size[0] + 6, 16))
        d = ImageDraw.Draw(pair)
        d.text((2, 2), f'{info["file_name"]}: ground truth', fill=(0, 0, 0), font=font)
        d.text((size[0] + 8, 2), f'prediction (score >= {score_thr})', fill=(0, 0, 0),
               font=font)
        tiles.append(pair)

    cols = 2
    rows = (len(tiles) + cols - 1) // cols
    tw, th = tiles[0].size
    sheet = Image.new('RGB', (cols * tw + (cols - 1) * 12, rows * th + (rows - 1) * 12),
                      (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * (tw + 12), (i // cols) * (th + 12)))
    sheet.save(out_file)
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
                             args.num_images, args.score_thr)
    print(f'training curves (loss, validation mAP): {curves}')
    print(f'predictions on validation images:       {preds}')


if __name__ == '__main__':
    main()
