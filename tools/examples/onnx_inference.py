"""Run a model exported by ``tools/deployment/export_onnx.py`` with ONNX Runtime and numpy
alone (no torch, mmdet, mmseg or mmdeploy): boxes from a RetinaNet, a label map from a
segmentor.

    python tools/examples/onnx_inference.py MODEL.onnx IMAGE [--score-thr 0.3] [--out OUT.png]

Everything the exported network leaves out is done here, with the settings the exporter
stored in the model's metadata (the config's test pipeline and model):

* preprocessing: the test pipeline's ``Resize`` (keeping the aspect ratio, as mmcv's
  ``imrescale``), the data preprocessor's BGR to RGB, mean and std, and padding to a
  multiple of ``pad_size_divisor``;
* detection (anchor heads with ``AnchorGenerator`` and ``DeltaXYWHBBoxCoder``, sigmoid
  scores: RetinaNet): anchors per level, top ``nms_pre`` (anchor, class) pairs above
  ``score_thr`` per level, box decoding clipped to the image, rescaling to the original image,
  class-wise NMS, ``max_per_img`` best;
* segmentation: logits upsampled to the input and then the original size (bilinear), argmax.

The results are mmdet's and mmseg's own post-processing of the same outputs, up to float
rounding (the tests compare them).
"""
import argparse
import json
from typing import Dict, List, Tuple

import cv2
import numpy as np
import onnxruntime


def load(model_path: str) -> Tuple[onnxruntime.InferenceSession, Dict]:
    """The session and the exporter's metadata (``scope``, ``model``, ``test_pipeline``,
    ``output_groups``, ``classes``), decoded from JSON."""
    session = onnxruntime.InferenceSession(model_path, providers=['CPUExecutionProvider'])
    meta = {key: json.loads(value)
            for key, value in session.get_modelmeta().custom_metadata_map.items()}
    return session, meta


def preprocess(image: np.ndarray, meta: Dict) -> Tuple[np.ndarray, Tuple[int, int], float]:
    """BGR uint8 (H, W, 3) image -> (network input (1, 3, H', W') float32, the resized
    image's (height, width) before padding, and the resize's scale factor)."""
    resize = next(step for step in meta['test_pipeline'] if step['type'].endswith('Resize'))
    height, width = image.shape[:2]
    if resize.get('keep_ratio', False):
        long_side, short_side = max(resize['scale']), min(resize['scale'])
        scale = min(long_side / max(height, width), short_side / min(height, width))
        size = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        size = tuple(resize['scale'])
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    prep = meta['model']['data_preprocessor']
    if prep.get('bgr_to_rgb', False):
        image = image[..., ::-1]
    image = (image - np.array(prep['mean'], np.float32)) / np.array(prep['std'], np.float32)
    divisor = prep.get('pad_size_divisor', 1)
    pad_h, pad_w = (-image.shape[0]) % divisor, (-image.shape[1]) % divisor
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)),
                   constant_values=prep.get('pad_value', 0))
    resized = (size[1], size[0])
    # mmdet rescales boxes by the size ratio of each axis; keep_ratio makes them near-equal.
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None]), resized, \
        (size[0] / width, size[1] / height)


def anchors(featmap_sizes: List[Tuple[int, int]], generator: Dict) -> List[np.ndarray]:
    """mmdet's ``AnchorGenerator`` (centre offset 0): per level (H * W * A, 4) boxes
    x1 y1 x2 y2, ordered by row, column, then ratio-major anchor."""
    spo = generator['scales_per_octave']
    scales = generator['octave_base_scale'] * 2.0 ** (np.arange(spo) / spo)
    h_ratios = np.sqrt(np.array(generator['ratios'], np.float32))
    levels = []
    for (height, width), stride in zip(featmap_sizes, generator['strides']):
        stride_w, stride_h = stride if isinstance(stride, list) else (stride, stride)
        ws = (stride_w / h_ratios[:, None] * scales[None, :]).ravel()
        hs = (stride_h * h_ratios[:, None] * scales[None, :]).ravel()
        base = np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=1)
        xs, ys = np.meshgrid(np.arange(width) * stride_w, np.arange(height) * stride_h)
        shifts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], axis=1)
        levels.append((shifts[:, None, :] + base[None]).reshape(-1, 4).astype(np.float32))
    return levels


def decode(priors: np.ndarray, deltas: np.ndarray, coder: Dict,
           image_shape: Tuple[int, int]) -> np.ndarray:
    """mmdet's ``DeltaXYWHBBoxCoder.decode``, boxes clipped to ``image_shape`` (H, W)."""
    deltas = deltas * np.array(coder['target_stds'], np.float32) + \
        np.array(coder['target_means'], np.float32)
    centres = (priors[:, :2] + priors[:, 2:]) * 0.5
    sizes = priors[:, 2:] - priors[:, :2]
    max_ratio = abs(np.log(coder.get('wh_ratio_clip', 16 / 1000)))
    centres = centres + sizes * deltas[:, :2]
    sizes = sizes * np.exp(np.clip(deltas[:, 2:], -max_ratio, max_ratio))
    boxes = np.concatenate([centres - 0.5 * sizes, centres + 0.5 * sizes], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image_shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image_shape[0])
    return boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, best score first (IoU above the threshold suppresses)."""
    order = np.argsort(-scores, kind='stable')
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod((bottom_right - top_left).clip(min=0), axis=1)
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.array(keep, dtype=np.int64)


def detect(outputs: List[np.ndarray], meta: Dict, image_shape: Tuple[int, int],
           scale: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (N, 4) in original-image pixels, scores (N,), labels (N,)) of the first
    image, from the ``cls_scores_*`` and ``bbox_preds_*`` outputs."""
    head = meta['model']['bbox_head']
    if head['anchor_generator']['type'] != 'AnchorGenerator' or \
            head['bbox_coder']['type'] != 'DeltaXYWHBBoxCoder' or \
            not head['loss_cls'].get('use_sigmoid', False):
        raise ValueError('This example decodes RetinaNet-style heads (AnchorGenerator, '
                         'DeltaXYWHBBoxCoder, sigmoid scores) only.')
    test_cfg = meta['model']['test_cfg']
    (_, num_levels), _ = meta['output_groups']  # cls_scores_*, then bbox_preds_*
    cls_scores, bbox_preds = outputs[:num_levels], outputs[num_levels:]
    level_anchors = anchors([c.shape[-2:] for c in cls_scores], head['anchor_generator'])
    num_classes = head['num_classes']
    boxes, scores, labels = [], [], []
    for cls_score, bbox_pred, priors in zip(cls_scores, bbox_preds, level_anchors):
        logits = cls_score[0].transpose(1, 2, 0).reshape(-1)
        with np.errstate(over='ignore'):  # exp(-logit) may overflow to inf: probability 0
            probs = 1 / (1 + np.exp(-logits))
        candidates = np.nonzero(probs > test_cfg['score_thr'])[0]
        candidates = candidates[np.argsort(-probs[candidates], kind='stable')]
        candidates = candidates[:test_cfg['nms_pre']]
        anchor_index, label = np.divmod(candidates, num_classes)
        deltas = bbox_pred[0].transpose(1, 2, 0).reshape(-1, 4)[anchor_index]
        boxes.append(decode(priors[anchor_index], deltas, head['bbox_coder'], image_shape))
        scores.append(probs[candidates])
        labels.append(label)
    boxes = np.concatenate(boxes) / np.array(scale * 2, np.float32)
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    min_size = test_cfg.get('min_bbox_size', -1)
    if min_size >= 0:
        wide = (boxes[:, 2] - boxes[:, 0] > min_size) & (boxes[:, 3] - boxes[:, 1] > min_size)
        boxes, scores, labels = boxes[wide], scores[wide], labels[wide]
    if len(boxes) == 0:
        return boxes, scores, labels
    # Class-wise NMS in one pass: each class's boxes are moved beyond all others.
    offsets = labels[:, None] * (boxes.max() + 1)
    keep = nms(boxes + offsets, scores, test_cfg['nms']['iou_threshold'])
    keep = keep[:test_cfg['max_per_img']]
    return boxes[keep], scores[keep], labels[keep]


def segment(logits: np.ndarray, image_shape: Tuple[int, int],
            original_shape: Tuple[int, int]) -> np.ndarray:
    """(H, W) label map of the first image from ``seg_logits`` (1, C, h, w): bilinear to
    the network input's size, then to the original image's, argmax over the classes."""
    logits = logits[0].transpose(1, 2, 0)  # (h, w, C) for cv2
    for height, width in (image_shape, original_shape):
        logits = resize_channels(logits, height, width)
    return logits.argmax(axis=2)


def resize_channels(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an (h, w, C) array to (height, width, C); cv2 takes at most 128
    channels at a time."""
    chunks = [cv2.resize(maps[..., i:i + 128], (width, height), interpolation=cv2.INTER_LINEAR)
              for i in range(0, maps.shape[2], 128)]
    return np.concatenate([chunk.reshape(height, width, -1) for chunk in chunks], axis=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='ONNX file written by tools/deployment/export_onnx.py')
    parser.add_argument('image')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections to print: at least this score (default 0.3)')
    parser.add_argument('--out', help='segmentation: write the label map to this PNG')
    args = parser.parse_args(argv)
    session, meta = load(args.model)
    image = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if image is None:
        parser.error(f'{args.image}: not an image file cv2 can read')
    batch, image_shape, scale = preprocess(image, meta)
    outputs = session.run(None, {'image': batch})
    classes = meta.get('classes') or []
    name = (lambda label: classes[label] if label < len(classes) else str(label))
    if meta['scope'] == 'mmseg':
        label_map = segment(outputs[0], image_shape, image.shape[:2])
        found = np.unique(label_map)
        print(f'Label map {label_map.shape[0]}x{label_map.shape[1]}, classes present: '
              f'{", ".join(name(int(label)) for label in found)}')
        if args.out:
            cv2.imwrite(args.out, label_map.astype(np.uint8 if found.max() < 256 else np.uint16))
        return
    boxes, scores, labels = detect(outputs, meta, image_shape, scale)
    shown = scores >= args.score_thr
    print(f'{len(boxes)} detections, {shown.sum()} scoring at least {args.score_thr}:')
    for box, score, label in zip(boxes[shown], scores[shown], labels[shown]):
        print(f'  {score:.3f}  x1 {box[0]:.1f}  y1 {box[1]:.1f}  x2 {box[2]:.1f}  '
              f'y2 {box[3]:.1f}  {name(int(label))}')

if __name__ == '__main__':
    main()
