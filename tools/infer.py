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

A video gives one JSON holding the predictions of every frame.
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import List, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402

# mmconvmlp registers ConvMLP and lets torch's safe loading read mmengine's checkpoints.
from mmconvmlp.engine import ReadableError  # noqa: E402
from mmconvmlp.engine.weights_fit import check_weights_fit  # noqa: E402
from mmconvmlp.engine.inference_precision import PRECISIONS, prepare_inference  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')
SCOPES = ('mmdet', 'mmseg')


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


def to_json(inferencer, sample) -> dict:
    """Detection: mmdet's prediction dict (``pred2dict``) plus ``label_names``;
    segmentation: the class names found, with their pixel counts."""
    classes = inferencer.model.dataset_meta['classes']
    if is_detector(inferencer):
        prediction = inferencer.pred2dict(sample)
        prediction['label_names'] = [classes[i] for i in prediction['labels']]
        return prediction
    labels, counts = np.unique(label_map(sample), return_counts=True)
    return dict(pixels={classes[i]: int(n) for i, n in zip(labels.tolist(), counts)})


def label_map(sample) -> np.ndarray:
    """The (H, W) class indices of a segmentation prediction."""
    return sample.pred_sem_seg.data[0].cpu().numpy()


# ----------------------------------------------------------------------------------------
# Runs over images and videos


def run_on_images(inferencer, paths: List[str], out_dir: str, score_thr: float) -> int:
    """Predict and draw each image; returns how many were written."""
    import mmcv
    from mmengine.utils import ProgressBar
    vis_dir, pred_dir = osp.join(out_dir, 'vis'), osp.join(out_dir, 'preds')
    os.makedirs(vis_dir, exist_ok=True)
    os.makedirs(pred_dir, exist_ok=True)
    progress = ProgressBar(len(paths))
    try:
        for path in paths:
            image = read_image(path)
            sample = predict(inferencer, image)
            name = osp.basename(path)
            stem = osp.splitext(name)[0]
            mmcv.imwrite(draw(inferencer, image, sample, score_thr)[..., ::-1],
                         osp.join(vis_dir, name))
            prediction = dict(image=path, **to_json(inferencer, sample))
            if not is_detector(inferencer):
                prediction['label_map'] = osp.join(pred_dir, stem + '.png')
                mmcv.imwrite(label_map(sample).astype(np.uint8), prediction['label_map'])
            with open(osp.join(pred_dir, stem + '.json'), 'w') as f:
                json.dump(prediction, f)
            progress.update()
    finally:
        print()  # ends the progress bar's line
    return len(paths)


def run_on_video(inferencer, path: str, out_dir: str, score_thr: float) -> Tuple[str, str, int]:
    """Predict and draw every frame; returns (video written, JSON written, frames)."""
    import cv2
    import mmcv
    from mmengine.utils import ProgressBar
    reader = mmcv.VideoReader(path)
    if not reader.opened or reader.frame_cnt == 0:
        raise InferenceInputError(f'{path} is not a readable video.')
    stem = osp.splitext(osp.basename(path))[0]
    os.makedirs(osp.join(out_dir, 'vis'), exist_ok=True)
    os.makedirs(osp.join(out_dir, 'preds'), exist_ok=True)
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
        inferencer = build_inferencer(args.config, args.checkpoint,
                                      args.device or default_device())
        print(f'precision: {prepare_inference(inferencer.model, args.precision)}')
        if kind == 'video':
            video_file, json_file, count = run_on_video(inferencer, paths[0], args.out_dir,
                                                        args.score_thr)
            print(f'video with the predictions drawn: {video_file} ({count} frames)\n'
                  f'predictions of every frame:       {json_file}')
        else:
            count = run_on_images(inferencer, paths, args.out_dir, args.score_thr)
            print(f'pictures with the predictions drawn: {osp.join(args.out_dir, "vis")} '
                  f'({count} images)\n'
                  f'predictions, one JSON per image:     {osp.join(args.out_dir, "preds")}')
    except ReadableError as error:  # a bad input: its message, without a traceback
        sys.exit(f'infer.py: {error}')


if __name__ == '__main__':
    main()
