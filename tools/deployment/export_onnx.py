"""Export a detector's or segmentor's network (backbone, neck and head, before
post-processing) to ONNX, and check the file with ONNX Runtime against PyTorch.

    python tools/deployment/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--shape H W]
        [--opset N] [--verify-detections IMAGE]

What the ONNX model holds: the model in mmengine's ``'tensor'`` mode. One input, ``image``:
float32 (batch, 3, height, width), already normalised as the config's data preprocessor
does (mean/std, channel order, padding); batch, height and width are dynamic. The outputs
are the head's raw maps, flattened in the order the model returns them and named after the
arguments of the head's ``predict_by_feat``, which turns them into results:

* single-stage detectors (RetinaNet, FCOS, ...): ``cls_scores_0 .. cls_scores_4`` then
  ``bbox_preds_0 .. bbox_preds_4`` (one per FPN level, strides 8 to 128 for RetinaNet), each
  (batch, anchors x classes or anchors x 4, height / stride, width / stride);
* encoder-decoder segmentors (Semantic FPN, UPerNet, ...): ``seg_logits``,
  (batch, classes, height / 4, width / 4) for Semantic FPN.

Post-processing (anchors, box decoding, NMS; upsampling and argmax) is not in the graph: the
model's metadata (``metadata_props``) carries what it needs, the model config and the test
pipeline as JSON, and ``tools/examples/onnx_inference.py`` shows it in numpy.

After exporting, the file is run with ONNX Runtime at another batch size and image size
than the export used and compared with PyTorch; the largest difference of each output must
stay within 1e-4 of that output's largest magnitude. ``--verify-detections IMAGE`` also runs
IMAGE through the config's test pipeline and mmdet's / mmseg's own post-processing on the
ONNX Runtime outputs, and checks that the detections or the label map equal PyTorch's.

The checkpoint is read with ``torch.load``'s safe (weights-only) mode and must fit the
config's model exactly.
"""
import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import logging
import os.path as osp
import sys
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Iterator, List, Optional, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mmconvmlp.config_models import build_eval_model, load_model_config  # noqa: E402
from mmconvmlp.engine.readable_errors import UsageError, first_line  # noqa: E402

#: How close ONNX Runtime must come to PyTorch: this fraction of an output's largest value.
TOLERANCE = 1e-4
#: Detections count as equal when their labels are, their scores differ by at most
#: :data:`TOLERANCE` and their boxes by at most :data:`TOLERANCE` of the image's longer side.


class TensorMode(nn.Module):
    """The detector's or segmentor's ``'tensor'`` mode as a function of the image alone,
    its outputs flattened into one tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(flatten(self.model._forward(image)))


def flatten(outputs) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [tensor for item in outputs for tensor in flatten(item)]


def check_exportable(model: nn.Module) -> None:
    """Refuse models whose tensor mode is not the raw outputs of one head."""
    from mmdet.models.detectors import SingleStageDetector
    from mmseg.models.segmentors import EncoderDecoder
    if not isinstance(model, (SingleStageDetector, EncoderDecoder)):
        raise UsageError(
            f'{type(model).__name__}: only single-stage detectors (RetinaNet, FCOS, ...) '
            f'and encoder-decoder segmentors are exported. A two-stage detector\'s tensor '
            f'mode already runs its RPN post-processing (NMS over the proposals), which '
            f'this exporter does not put in the graph.')


def output_groups(model: nn.Module, outputs) -> List[Tuple[str, int]]:
    """``(name, number of tensors)`` of each group of the ``'tensor'`` outputs, in order:
    ``seg_logits`` for a segmentor; for a detector the arguments of its head's
    ``predict_by_feat`` with the number of levels of each."""
    if isinstance(outputs, torch.Tensor):
        return [('seg_logits', 1)]
    params = list(inspect.signature(model.bbox_head.predict_by_feat).parameters)
    return [(params[i], len(group)) for i, group in enumerate(outputs)]


def output_names(groups: Sequence[Tuple[str, int]]) -> List[str]:
    """One name per output: ``seg_logits``, or ``{group}_{level}`` for per-level maps."""
    return [name if name == 'seg_logits' else f'{name}_{level}'
            for name, count in groups for level in range(count)]


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Load ``checkpoint`` (safe loading) strictly into ``model``, or explain why not."""
    import pickle

    from mmengine.runner import load_checkpoint
    if not osp.isfile(checkpoint):
        raise UsageError(f'{checkpoint}: no such checkpoint file.')
    try:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                        logger='silent')
    except pickle.UnpicklingError as error:
        raise UsageError(f'{checkpoint}: safe loading refused it (it holds objects other '
                         f'than weights): {first_line(error)}') from error
    except (RuntimeError, KeyError) as error:
        message = ' '.join(str(error).split())
        raise UsageError(f'{checkpoint} does not fit the config\'s model: '
                         f'{message[:500]}') from error


@contextmanager
def traceable_upsampling(model: nn.Module) -> Iterator[None]:
    """Within the context, mmseg's ``Upsample`` layers that scale by a factor (FPNHead's)
    call ``F.interpolate`` with that factor. Their own forward computes the output size with
    ``int()``, which a trace records as a constant, so the exported graph would upsample to
    the traced size whatever the input; the interpolation is the same."""
    from mmseg.models.utils import Upsample

    def by_factor(layer: Upsample, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=layer.scale_factor, mode=layer.mode,
                             align_corners=layer.align_corners)

    layers = [m for m in model.modules() if isinstance(m, Upsample) and not m.size]
    for layer in layers:
        layer.forward = partial(by_factor, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def export(model: nn.Module, groups, shape: Tuple[int, int], opset: int, out: str) -> None:
    """Write the ``'tensor'`` mode of ``model`` traced on a 1x3xHxW image to ``out``,
    with dynamic batch, height and width."""
    names = output_names(groups)
    image = torch.randn(1, 3, *shape)
    dynamic_axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}}
    dynamic_axes.update({name: {0: 'batch', 2: f'{name}_height', 3: f'{name}_width'}
                         for name in names})
    with torch.no_grad(), warnings.catch_warnings(), traceable_upsampling(model):
        # The TorchScript exporter's deprecation and the tracer's notes on Python values:
        # the check at another input size below finds what the trace did not generalise.
        warnings.simplefilter('ignore')
        try:
            # In eval mode: the exporter puts the module back into the mode it found it in.
            torch.onnx.export(TensorMode(model).eval(), (image,), out, dynamo=False,
                              input_names=['image'], output_names=names,
                              dynamic_axes=dynamic_axes, opset_version=opset)
        except Exception as error:  # the exporter's many error types, told in one line
            raise UsageError(f'torch.onnx.export failed at opset {opset}: '
                             f'{type(error).__name__}: {first_line(error)}') from error


def add_metadata(out: str, cfg, scope: str, groups) -> None:
    """Store what post-processing needs in the ONNX model's ``metadata_props``, each as
    JSON: ``scope``, ``output_groups``, ``model`` (the model config), ``test_pipeline`` and
    ``classes`` (the test data set's class names, where the config names a data set)."""
    import onnx
    from mmdet.utils import get_test_pipeline_cfg
    onnx_model = onnx.load(out)
    entries = dict(scope=scope, output_groups=groups, model=cfg.model.to_dict(),
                   test_pipeline=[dict(step) for step in get_test_pipeline_cfg(cfg)],
                   classes=class_names(cfg))
    for key, value in entries.items():
        onnx_model.metadata_props.add(key=key, value=json.dumps(value, default=str))
    onnx.save(onnx_model, out)


def class_names(cfg) -> List[str]:
    """The class names of the config's test data set: its ``metainfo``, else its type's."""
    from mmengine.registry import DefaultScope
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    while 'dataset' in dataset:  # dataset wrappers
        dataset = dataset['dataset']
    classes = (dataset.get('metainfo') or {}).get('classes')
    if classes is None and 'type' in dataset:
        with DefaultScope.overwrite_default_scope(cfg.default_scope):
            registry = importlib.import_module(f'{cfg.default_scope}.registry')
            dataset_class = registry.DATASETS.get(dataset['type'])
        classes = getattr(dataset_class, 'METAINFO', {}).get('classes')
    return list(classes or [])


def onnx_session(out: str):
    import onnxruntime
    return onnxruntime.InferenceSession(out, providers=['CPUExecutionProvider'])


def run_onnx(session, image: torch.Tensor) -> List[torch.Tensor]:
    return [torch.from_numpy(array) for array in
            session.run(None, {'image': image.numpy()})]


def check_outputs(model: nn.Module, session, groups, shape: Tuple[int, int]) -> bool:
    """Compare ONNX Runtime with PyTorch on a 2x3xHxW image; print each output's largest
    difference; True if all are within :data:`TOLERANCE`."""
    image = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = TensorMode(model)(image)
    actual = run_onnx(session, image)
    print(f'ONNX Runtime against PyTorch on a 2x3x{shape[0]}x{shape[1]} input:')
    print('| output | shape | largest difference | relative to the largest value |')
    print('|---|---|---|---|')
    good = True
    for name, want, got in zip(output_names(groups), expected, actual):
        if tuple(want.shape) != tuple(got.shape):
            print(f'| {name} | PyTorch {tuple(want.shape)}, ONNX {tuple(got.shape)} | - | - |')
            good = False
            continue
        diff = (want - got).abs().max().item()
        relative = diff / max(want.abs().max().item(), 1e-12)
        good &= relative <= TOLERANCE
        print(f'| {name} | {"x".join(map(str, want.shape))} | {diff:.2e} | {relative:.2e} |')
    return good


def verify_shape(shape: Tuple[int, int]) -> Tuple[int, int]:
    """A different image size than the export's, still a multiple of 32 where it was."""
    return shape[0] + 64, shape[1] + 32


def prepared_image(cfg, model: nn.Module, image_path: str):
    """(normalised batch, data samples) of IMAGE through the config's test pipeline
    (annotation loading left out) and the model's data preprocessor."""
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg
    if not osp.isfile(image_path):
        raise UsageError(f'--verify-detections {image_path}: no such image file.')
    steps = [step for step in copy.deepcopy(get_test_pipeline_cfg(cfg))
             if not step['type'].endswith('LoadAnnotations')]
    data = Compose(steps)(dict(img_path=image_path))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    return batch['inputs'], batch['data_samples']


def verify_detections(model: nn.Module, session, groups, scope: str, cfg,
                      image_path: str) -> bool:
    """Run IMAGE through PyTorch and through ONNX Runtime plus the model's own
    post-processing; print and compare the results."""
    image, samples = prepared_image(cfg, model, image_path)
    with torch.no_grad():
        expected = model.predict(image, copy.deepcopy(samples))[0]
        outputs = run_onnx(session, image)
        metas = [sample.metainfo for sample in samples]
        if scope == 'mmdet':
            grouped, start = [], 0
            for _, count in groups:
                grouped.append(outputs[start:start + count])
                start += count
            results = model.bbox_head.predict_by_feat(*grouped, batch_img_metas=metas,
                                                      rescale=True)
            actual = model.add_pred_to_datasample(copy.deepcopy(samples), results)[0]
            return compare_detections(expected.pred_instances, actual.pred_instances,
                                      max(metas[0]['ori_shape']))
        if model.test_cfg.get('mode', 'whole') != 'whole':
            raise UsageError('--verify-detections covers segmentors tested in whole mode '
                             '(test_cfg.mode="whole"), not sliding windows.')
        logits = model.decode_head.predict_by_feat(outputs[0], metas)
        actual = model.postprocess_result(logits, copy.deepcopy(samples))[0]
    return compare_label_maps(expected, actual)


def pair_detections(expected, actual, box_tolerance: float) -> Optional[List[int]]:
    """For each detection of ``expected`` (boxes, scores, labels), the index of one of
    ``actual`` with the same label, a score within :data:`TOLERANCE` and a box within
    ``box_tolerance``, each used once; None where one has no such counterpart. Scores that
    differ by rounding may rank near-ties the other way round, hence no order."""
    boxes, scores, labels = (torch.as_tensor(values) for values in actual)
    free = torch.ones(len(boxes), dtype=torch.bool)
    pairs = []
    for box, score, label in zip(*(torch.as_tensor(values) for values in expected)):
        close = free & (labels == label) & ((scores - score).abs() <= TOLERANCE) & \
            ((boxes - box).abs().amax(dim=1) <= box_tolerance)
        if not close.any():
            return None
        pairs.append(int(close.nonzero()[0]))
        free[pairs[-1]] = False
    return pairs


def compare_detections(expected, actual, image_side: int) -> bool:
    print(f'Detections: PyTorch {len(expected)}, ONNX Runtime {len(actual)}', end='')
    if len(expected) != len(actual):
        print(': different numbers')
        return False
    if len(expected) == 0:
        print(': none to compare (random weights may score nothing above the threshold)')
        return True
    pairs = pair_detections((expected.bboxes, expected.scores, expected.labels),
                            (actual.bboxes, actual.scores, actual.labels),
                            TOLERANCE * image_side)
    if pairs is None:
        print(': NOT equal, a detection has no counterpart of the same label, score and box')
        return False
    box_diff = (expected.bboxes - actual.bboxes[pairs]).abs().max().item()
    score_diff = (expected.scores - actual.scores[pairs]).abs().max().item()
    print(f'; each has a counterpart of the same label, largest box difference '
          f'{box_diff:.2e} px, largest score difference {score_diff:.2e}: equal')
    return True


def compare_label_maps(expected, actual) -> bool:
    want, got = expected.pred_sem_seg.data, actual.pred_sem_seg.data
    differing = (want != got).sum().item()
    print(f'Label maps ({want.shape[-2]}x{want.shape[-1]}): {differing} pixels differ '
          f'between PyTorch and ONNX Runtime: {"equal" if differing == 0 else "NOT equal"}')
    return differing == 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a detector or segmentor (tensor mode) to ONNX and check it.')
    parser.add_argument('config', help='config file, or an mmdet::/mmseg:: name')
    parser.add_argument('checkpoint', help='weights of the config\'s model')
    parser.add_argument('out', help='the ONNX file to write')
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1216),
                        metavar=('H', 'W'), help='image size traced at export (default 800 '
                                                 '1216); the file takes any size')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset (default 17)')
    parser.add_argument('--verify-detections', metavar='IMAGE',
                        help='also compare post-processed results on this image')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.getLogger('mmengine').setLevel(logging.ERROR)
    try:
        if min(args.shape) < 32:
            raise UsageError(f'--shape {args.shape[0]} {args.shape[1]}: height and width '
                             f'must be at least 32 pixels.')
        missing = [name for name in ('onnx', 'onnxruntime')
                   if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f'{" and ".join(missing)} not installed: pip install onnx '
                             f'onnxruntime (tools/setup_env.sh installs both).')
        from mmengine.registry import DefaultScope
        cfg, scope = load_model_config(args.config)
        model = build_eval_model(cfg, torch.device('cpu'))
        check_exportable(model)
        load_weights(model, args.checkpoint)
        with torch.no_grad():
            sample_outputs = model._forward(torch.zeros(1, 3, 64, 64))
        groups = output_groups(model, sample_outputs)
        export(model, groups, tuple(args.shape), args.opset, args.out)
        add_metadata(args.out, cfg, scope, groups)
        print(f'Wrote {args.out}: input image (batch, 3, height, width), outputs '
              f'{", ".join(output_names(groups))}.')
        session = onnx_session(args.out)
        good = check_outputs(model, session, groups, verify_shape(tuple(args.shape)))
        if args.verify_detections:
            with DefaultScope.overwrite_default_scope(scope):  # the pipeline's transforms
                good &= verify_detections(model, session, groups, scope, cfg,
                                          args.verify_detections)
    except UsageError as error:
        sys.exit(f'export_onnx.py: error: {error}')
    if not good:
        sys.exit('export_onnx.py: error: ONNX Runtime does not reproduce PyTorch within the '
                 'tolerance above.')


if __name__ == '__main__':
    main()
