"""Run a trained detector (mmdet 3.x config) or segmentor (mmseg 1.x config) on your own
images or a video, and save the pictures with the predictions drawn and the predictions as JSON.

    python tools/infer.py CONFIG CHECKPOINT INPUT [--out-dir DIR] [--score-thr T] [--device D]

INPUT is an image, a folder of images (the images directly inside it) or a video file. The model
runs through mmdet's ``DetInferencer`` / mmseg's ``MMSegInferencer`` and the pictures are drawn
by their visualizers. Written to OUT_DIR (default ``outputs/``):

    vis/NAME            the image with the predictions drawn (a video: vis/STEM.mp4)
    preds/STEM.json     detection: mmdet's prediction dict (labels, scores, boxes x1 y1 x2 y2 in
                        pixels of the input, masks as COCO RLE) plus the class names;
                        segmentation: the classes found and the pixels of each
    preds/STEM.png      segmentation: the label map (one class index per pixel)

A video gives one JSON holding the predictions of every frame. An image more than twice the
model's test size (its test pipeline's Resize, else the size its data preprocessor pads to)
is shrunk to twice that size before the model runs, so memory follows the model, not the
photo: its picture is drawn at the shrunk size, and its boxes, masks and label map are given
in pixels of the input all the same. Images that cannot be read are skipped and listed at the
end, and the tool then exits with status 1.
"""
import argparse
import json
import os
import os.path as osp
import sys
import tempfile
from typing import List, Optional, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402

# mmconvmlp registers ConvMLP and lets torch's safe loading read mmengine's checkpoints.
from mmconvmlp.engine import ReadableError  # noqa: E402
from mmconvmlp.engine.weights_fit import check_weights_fit  # noqa: E402
from mmconvmlp.engine.inference_precision import PRECISIONS, prepare_inference  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')
SCOPES = ('mmdet', 'mmseg')
#: An image larger than this many times the model's test size is shrunk to that size first.
SHRINK_ABOVE = 2


class InferenceInputError(ReadableError, ValueError):
    """An input of the tool (config, checkpoint, image, video, device) is unusable; the message
    names the file and says what to do."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='mmdet or mmseg config file')
    parser.add_argument('checkpoint', help='checkpoint file (path or URL)')
    parser.add_argument('input', help='an image, a folder of images or a video file')
    parser.add_argument('--out-dir', default='outputs', help='output folder (default: outputs)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw the predictions scoring at least this (default '
                             '0.3); the JSON keeps them all, with their scores')
    parser.add_argument('--precision', choices=PRECISIONS, default='auto',
                        help='auto (default: bfloat16 where the CPU or GPU has bfloat16 units, '
                             'float16 on older GPUs, else float32), float32, bfloat16 or '
                             'float16: backbone, neck and heads in it, post-processing in '
                             'float32')
    parser.add_argument('--device', help='cpu, cuda, cuda:1, ... (default: cuda if available, '
                                          'else cpu)')
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Inputs


def list_inputs(path: str) -> Tuple[str, List[str]]:
    """``('video', [path])`` for a video file, ``('images', paths)`` for an image or for the
    images directly inside a folder (sorted by name)."""
    if osp.isdir(path):
        images = sorted(osp.join(path, name) for name in os.listdir(path)
                        if name.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            raise InferenceInputError(
                f'{path} holds no images (files ending in {", ".join(IMAGE_EXTENSIONS)}).')
        return 'images', images
    if not osp.isfile(path):
        raise InferenceInputError(f'No such file or folder: {path}')
    extension = osp.splitext(path)[1].lower()
    if extension in IMAGE_EXTENSIONS:
        return 'images', [path]
    if extension in VIDEO_EXTENSIONS:
        return 'video', [path]
    raise InferenceInputError(
        f'{path}: unknown extension {extension!r}. Give an image '
        f'({", ".join(IMAGE_EXTENSIONS)}), a folder of images or a video '
        f'({", ".join(VIDEO_EXTENSIONS)}).')


def read_image(path: str) -> np.ndarray:
    """The image at ``path`` as an (H, W, 3) uint8 BGR array, decoded as mmdet's and mmseg's
    ``LoadImageFromFile`` decode it."""
    import mmcv
    try:
        image = mmcv.imread(path)
    except Exception as error:  # cv2 raises on some corrupt data, returns None on other
        raise InferenceInputError(f'{path} is not a readable image ({error}).') from None
    if image is None:
        raise InferenceInputError(f'{path} is not a readable image.')
    return image


def check_out_dir(out_dir: str) -> None:
    """Make ``out_dir``/vis and ``out_dir``/preds, or say why they cannot be written."""
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise InferenceInputError(f'--out-dir {out_dir} is a file, not a folder: give a '
                                  'folder to write the results in.')
    try:
        for sub in ('vis', 'preds'):
            os.makedirs(osp.join(out_dir, sub), exist_ok=True)
            with tempfile.TemporaryFile(dir=osp.join(out_dir, sub)):
                pass
    except OSError as error:
        raise InferenceInputError(
            f'--out-dir {out_dir} cannot be written ({error.strerror or error}: '
            f'{error.filename or out_dir}): give a folder you can write to.') from None


def test_size(cfg) -> Optional[Tuple[int, int]]:
    """The (long side, short side) the model is tested at: what the Resize of the config's
    test pipeline fits images into, else the size its data preprocessor pads to or its
    sliding window (segmentors without a Resize); None when the config says none."""
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get('pipeline') or []
    sizes = [step.get('scale') for step in pipeline if isinstance(step, dict)
             and str(step.get('type', '')).endswith('Resize') and step.get('keep_ratio')]
    model = cfg.get('model', {})
    sizes += [model.get('data_preprocessor', {}).get('size'),
              (model.get('test_cfg') or {}).get('crop_size')]
    size = next((size for size in sizes if size), None)
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    return max(size), min(size)


def shrink(image: np.ndarray, limits: Optional[Tuple[int, int]]) -> np.ndarray:
    """``image`` shrunk (by area averaging) to :data:`SHRINK_ABOVE` times the size the test
    pipeline would resize it to, when it is larger than that; else ``image`` itself."""
    import cv2
    height, width = image.shape[:2]
    if limits is None:
        return image
    factor = max(max(height, width) / (SHRINK_ABOVE * limits[0]),
                 min(height, width) / (SHRINK_ABOVE * limits[1]))
    if factor <= 1:
        return image
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------------------
# The model


def default_device() -> str:
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def check_device(device: str) -> None:
    import torch
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise InferenceInputError(f'--device {device}: CUDA is not available here; use '
                                  '--device cpu.')


def inferencer_class(scope: str):
    """``DetInferencer`` or ``MMSegInferencer``, checking that the checkpoint fits the model
    before loading it (they load what fits and warn about the rest)."""
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer as Base
    else:
        from mmseg.apis import MMSegInferencer as Base

    class CheckedInferencer(Base):
        def __init__(self, model, weights, **kwargs):
            self.checkpoint_path = weights
            super().__init__(model=model, weights=weights, **kwargs)

        def _load_weights_to_model(self, model, checkpoint, cfg):
            if checkpoint is not None:
                check_weights_fit(model, checkpoint, self.checkpoint_path)
            super()._load_weights_to_model(model, checkpoint, cfg)

    return CheckedInferencer


def build_inferencer(config: str, checkpoint: str, device: str):
    """mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` (by the config's
    ``default_scope``) with the checkpoint loaded and its visualizer set to the model's
    classes and colours (``model.dataset_meta``, from the checkpoint's meta)."""
    from mmengine.config import Config
    if not osp.isfile(config):
        raise InferenceInputError(f'No such config file: {config}')
    if '://' not in checkpoint and not osp.isfile(checkpoint):
        raise InferenceInputError(f'No such checkpoint file: {checkpoint}')
    check_device(device)
    cfg = Config.fromfile(config)
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise InferenceInputError(
            f'{config} has default_scope={scope!r}: infer.py runs mmdet and mmseg configs.')
    # A checkpoint that safe loading refuses, or no checkpoint at all, raises mmconvmlp's
    # readable errors (CheckpointRefusedError, CheckpointUnreadableError).
    inferencer = inferencer_class(scope)(model=cfg, weights=checkpoint, device=device)
    inferencer.show_progress = False  # infer.py shows its own, over all inputs
    meta = inferencer.model.dataset_meta
    if scope == 'mmdet':
        inferencer.visualizer.dataset_meta = meta
    else:
        inferencer.visualizer.set_dataset_meta(meta.get('classes'), meta.get('palette'))
    return inferencer


def is_detector(inferencer) -> bool:
    from mmdet.apis import DetInferencer
    return isinstance(inferencer, DetInferencer)


# ----------------------------------------------------------------------------------------
# Prediction and drawing


def predict(inferencer, image: np.ndarray):
    """The prediction of the model for one (H, W, 3) uint8 BGR image: a ``DetDataSample``
    (``pred_instances``) or a ``SegDataSample`` (``pred_sem_seg``)."""
    out = inferencer(image, return_datasamples=True)
    # DetInferencer answers {'predictions': [sample]}, MMSegInferencer the sample itself.
    return out['predictions'][0] if isinstance(out, dict) else out


def draw(inferencer, image: np.ndarray, sample, score_thr: float, draw_gt: bool = False):
    """``image`` (H, W, 3 BGR) with the predictions of ``sample`` drawn by the inferencer's
    visualizer (mmdet's ``DetLocalVisualizer``, mmseg's ``SegLocalVisualizer``); with
    ``draw_gt`` the ground truth of ``sample`` on the left. Returns an RGB array."""
    options = dict(pred_score_thr=score_thr) if is_detector(inferencer) else {}
    inferencer.visualizer.add_datasample('prediction', image[..., ::-1], sample,
                                         draw_gt=draw_gt, draw_pred=True, show=False, **options)
    return inferencer.visualizer.get_image()


def to_json(inferencer, sample, size: Optional[Tuple[int, int]] = None) -> dict:
    """Detection: mmdet's prediction dict (``pred2dict``) plus ``label_names``;
    segmentation: the class names found, with their pixel counts. ``size`` (width, height)
    is the input's, when the model saw it shrunk: boxes and masks are scaled back to it."""
    classes = inferencer.model.dataset_meta['classes']
    if is_detector(inferencer):
        prediction = inferencer.pred2dict(sample)
        prediction['label_names'] = [classes[i] for i in prediction['labels']]
        if size is not None:
            in_input_pixels(prediction, sample, size)
        return prediction
    labels, counts = np.unique(label_map(sample, size), return_counts=True)
    return dict(pixels={classes[i]: int(n) for i, n in zip(labels.tolist(), counts)})


def in_input_pixels(prediction: dict, sample, size: Tuple[int, int]) -> None:
    """Scale the boxes of ``prediction`` (made for the shrunk image of ``sample``) to the
    input's ``size`` and encode its masks at that size: each mask's nonzero part is enlarged
    (nearest pixel) into one full-size buffer, encoded, and cleared again."""
    import pycocotools.mask as mask_util
    height, width = sample.ori_shape[:2]
    scale = np.array([size[0] / width, size[1] / height] * 2)
    prediction['bboxes'] = (np.asarray(prediction['bboxes']).reshape(-1, 4)
                            * scale).tolist()
    if 'masks' not in prediction:
        return
    rows = np.minimum((np.arange(size[1]) * (height / size[1])).astype(np.int64), height - 1)
    cols = np.minimum((np.arange(size[0]) * (width / size[0])).astype(np.int64), width - 1)
    full = np.zeros((size[1], size[0]), np.uint8, order='F')
    masks = []
    for mask in sample.pred_instances.masks.cpu().numpy():
        ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        region = None
        if ys.size:
            region = (slice(np.searchsorted(rows, ys[0]), np.searchsorted(rows, ys[-1], 'right')),
                      slice(np.searchsorted(cols, xs[0]), np.searchsorted(cols, xs[-1], 'right')))
            full[region] = mask[np.ix_(rows[region[0]], cols[region[1]])]
        encoded = mask_util.encode(full)
        masks.append(dict(size=encoded['size'], counts=encoded['counts'].decode()))
        if region is not None:
            full[region] = 0
    prediction['masks'] = masks


def label_map(sample, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """The (H, W) class indices of a segmentation prediction, at ``size`` (width, height)
    when given."""
    import cv2
    labels = sample.pred_sem_seg.data[0].cpu().numpy()
    if size is None or labels.shape[::-1] == tuple(size):
        return labels
    return cv2.resize(labels.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST)


# ----------------------------------------------------------------------------------------
# Runs over images and videos


def run_on_images(inferencer, paths: List[str], out_dir: str,
                  score_thr: float) -> Tuple[int, List[str]]:
    """Predict and draw each image that can be read; returns how many were written and,
    for each image skipped, why."""
    import mmcv
    from mmengine.utils import ProgressBar
    vis_dir, pred_dir = osp.join(out_dir, 'vis'), osp.join(out_dir, 'preds')
    limits = test_size(inferencer.cfg)
    written, skipped = 0, []
    progress = ProgressBar(len(paths))
    try:
        for path in paths:
            try:
                image = read_image(path)
            except InferenceInputError as error:
                skipped.append(str(error))
                progress.update()
                continue
            size = image.shape[1::-1]
            image = shrink(image, limits)
            shrunk = size if image.shape[1::-1] != size else None
            sample = predict(inferencer, image)
            name = osp.basename(path)
            stem = osp.splitext(name)[0]
            mmcv.imwrite(draw(inferencer, image, sample, score_thr)[..., ::-1],
                         osp.join(vis_dir, name))
            prediction = dict(image=path, **to_json(inferencer, sample, shrunk))
            if not is_detector(inferencer):
                prediction['label_map'] = osp.join(pred_dir, stem + '.png')
                labels = label_map(sample, shrunk)
                mmcv.imwrite(labels.astype(np.uint8 if labels.max() < 256 else np.uint16),
                             prediction['label_map'])
            with open(osp.join(pred_dir, stem + '.json'), 'w') as f:
                json.dump(prediction, f)
            written += 1
            progress.update()
    finally:
        print()  # ends the progress bar's line
    return written, skipped


def skipped_summary(skipped: List[str], total: int) -> str:
    """The closing message of a run that skipped unreadable images."""
    head = (f'none of the {total} images could be read' if len(skipped) == total else
            f'{len(skipped)} of {total} images could not be read and were skipped (the other '
            f'{total - len(skipped)} were written)')
    return head + ':\n' + '\n'.join(f'  {reason}' for reason in skipped)


def run_on_video(inferencer, path: str, out_dir: str, score_thr: float) -> Tuple[str, str, int]:
    """Predict and draw every frame; returns (video written, JSON written, frames)."""
    import cv2
    import mmcv
    from mmengine.utils import ProgressBar
    reader = mmcv.VideoReader(path)
    if not reader.opened or reader.frame_cnt == 0:
        raise InferenceInputError(f'{path} is not a readable video.')
    stem = osp.splitext(osp.basename(path))[0]
    video_file = osp.join(out_dir, 'vis', stem + '.mp4')
    json_file = osp.join(out_dir, 'preds', stem + '.json')
    writer = cv2.VideoWriter(video_file, cv2.VideoWriter_fourcc(*'mp4v'), reader.fps,
                             (reader.width, reader.height))
    frames = []
    progress = ProgressBar(reader.frame_cnt)
    try:
        for frame in reader:
            sample = predict(inferencer, frame)
            picture = draw(inferencer, frame, sample, score_thr)
            writer.write(np.ascontiguousarray(picture[..., ::-1]))
            frames.append(to_json(inferencer, sample))
            progress.update()
    finally:
        writer.release()
        print()  # ends the progress bar's line
    with open(json_file, 'w') as f:
        json.dump(dict(video=path, fps=reader.fps, frames=frames), f)
    return video_file, json_file, len(frames)


def main(argv=None):
    args = parse_args(argv)
    try:
        kind, paths = list_inputs(args.input)
        check_out_dir(args.out_dir)
        inferencer = build_inferencer(args.config, args.checkpoint,
                                      args.device or default_device())
        print(f'precision: {prepare_inference(inferencer.model, args.precision)}')
        if kind == 'video':
            video_file, json_file, count = run_on_video(inferencer, paths[0], args.out_dir,
                                                        args.score_thr)
            print(f'video with the predictions drawn: {video_file} ({count} frames)\n'
                  f'predictions of every frame:       {json_file}')
        else:
            count, skipped = run_on_images(inferencer, paths, args.out_dir, args.score_thr)
            print(f'pictures with the predictions drawn: {osp.join(args.out_dir, "vis")} '
                  f'({count} images)\n'
                  f'predictions, one JSON per image:     {osp.join(args.out_dir, "preds")}')
            if skipped:
                raise InferenceInputError(skipped_summary(skipped, len(paths)))
    except ReadableError as error:  # a bad input: its message, without a traceback
        sys.exit(f'infer.py: {error}')


if __name__ == '__main__':
    main()
