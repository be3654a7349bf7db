"""tools/deployment/export_onnx.py and tools/examples/onnx_inference.py on RetinaNet and
Semantic FPN with ConvMLP-S, random weights the tests write, small test images (the
configs' test pipelines resize to a few hundred pixels instead of 1333x800 / 2048x512)."""
import contextlib
import importlib.util
import io
import os.path as osp
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip('onnx', reason='onnx is not installed (pip install onnx onnxruntime)')
onnxruntime = pytest.importorskip(
    'onnxruntime', reason='onnxruntime is not installed: the export is checked with it '
                          '(pip install onnx onnxruntime)')

from random_weights import randomize_  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOLERANCE = 1e-4
#: (config, the test pipeline's Resize) of each exported model.
MODELS = {
    'retinanet': ('configs/detection/retinanet_convmlp_s_coco.py',
                  "dict(type='Resize', scale=(200, 150), keep_ratio=True)"),
    'fpn': ('configs/segmentation/fpn_convmlp_s_ade20k.py',
            "dict(type='Resize', scale=(256, 128), keep_ratio=True)"),
}
PACK = {'retinanet': "dict(type='PackDetInputs')", 'fpn': "dict(type='PackSegInputs')"}


def load_tool(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_onnx = load_tool('tools/deployment/export_onnx.py', 'export_onnx')
example = load_tool('tools/examples/onnx_inference.py', 'onnx_inference')


def run_tool(argv):
    """(stdout, the exit message or None) of export_onnx.py's main."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            export_onnx.main(argv)
            message = None
        except SystemExit as exit_:
            message = str(exit_.code)
    return out.getvalue(), message


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    """A 120x160 BGR test image: noise with two filled rectangles."""
    import cv2
    pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    cv2.rectangle(pixels, (20, 30), (90, 100), (0, 0, 255), -1)
    cv2.rectangle(pixels, (100, 10), (150, 60), (0, 200, 0), -1)
    path = str(tmp_path_factory.mktemp('image') / 'image.png')
    cv2.imwrite(path, pixels)
    return path


def moderate_head(model) -> None:
    """Scale and shift RetinaNet's output layers so that on an image the class logits have
    mean -2 and standard deviation 2 and the box deltas mean 0 and standard deviation 0.5,
    as a trained head's: scores spread over (0, 1) instead of saturating at 1, where the
    ranking of the detections would rest on float rounding, and boxes do not stretch to the
    clipping limits."""
    head = model.bbox_head
    with torch.no_grad():
        for outputs, layer, (mean, spread) in zip(
                model._forward(torch.randn(1, 3, 64, 64)), (head.retina_cls, head.retina_reg),
                ((-2., 2.), (0., 0.5))):
            values = torch.cat([level.flatten() for level in outputs])
            scale = spread / values.std()
            layer.weight.mul_(scale)
            layer.bias.mul_(scale).add_(mean - values.mean() * scale)


def write_model(kind: str, folder) -> SimpleNamespace:
    """The test config, a checkpoint of random weights and the model holding them."""
    config, resize = MODELS[kind]
    config_path = folder / f'{kind}.py'
    config_path.write_text(
        f"_base_ = {osp.join(ROOT, config)!r}\n"
        f"test_dataloader = dict(dataset=dict(pipeline=[dict(type='LoadImageFromFile'), "
        f"{resize}, {PACK[kind]}]))\n")
    cfg, scope = export_onnx.load_model_config(str(config_path))
    model = randomize_(export_onnx.build_eval_model(cfg, torch.device('cpu')))
    if kind == 'retinanet':
        moderate_head(model)
    checkpoint = folder / f'{kind}.pth'
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    return SimpleNamespace(config=str(config_path), checkpoint=str(checkpoint), cfg=cfg,
                           scope=scope, model=model)


@pytest.fixture(scope='module', params=sorted(MODELS))
def exported(request, tmp_path_factory, image):
    """A model exported by the tool at 64x64, with the tool's output and exit message."""
    folder = tmp_path_factory.mktemp(request.param)
    written = write_model(request.param, folder)
    onnx_path = str(folder / f'{request.param}.onnx')
    stdout, message = run_tool([written.config, written.checkpoint, onnx_path,
                                '--shape', '64', '64', '--verify-detections', image])
    return SimpleNamespace(**vars(written), kind=request.param, onnx=onnx_path,
                           stdout=stdout, message=message)


def table_rows(stdout: str):
    """(output name, relative difference) of each row of the tool's comparison table."""
    rows = [line.strip('|').split('|') for line in stdout.splitlines()
            if line.startswith('| ') and not line.startswith('| output')]
    return [(cells[0].strip(), float(cells[3])) for cells in rows]


def test_export_matches_pytorch_at_another_size(exported):
    assert exported.message is None, exported.stdout + str(exported.message)
    rows = table_rows(exported.stdout)
    expected = ['seg_logits'] if exported.kind == 'fpn' else \
        [f'{group}_{level}' for group in ('cls_scores', 'bbox_preds') for level in range(5)]
    assert [name for name, _ in rows] == expected
    assert all(relative <= TOLERANCE for _, relative in rows)

    # Independently of the tool: a third batch size and image size.
    session = onnxruntime.InferenceSession(exported.onnx, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    image = torch.randn(3, 3, 96, 160, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = export_onnx.TensorMode(exported.model)(image)
    got = session.run(None, {'image': image.numpy()})
    assert [o.name for o in session.get_outputs()] == expected
    for w, g in zip(want, got):
        assert tuple(w.shape) == g.shape
        assert (w - torch.from_numpy(g)).abs().max() <= TOLERANCE * w.abs().max()


def test_verify_detections_gives_pytorchs_results(exported):
    assert exported.message is None, exported.stdout + str(exported.message)
    if exported.kind == 'fpn':
        assert 'Label maps (120x160): 0 pixels differ' in exported.stdout
        return
    line = next(line for line in exported.stdout.splitlines()
                if line.startswith('Detections:'))
    counts = line.split(';')[0].split()
    assert counts[2].rstrip(',') == counts[5] and int(counts[5]) > 0, line
    assert 'each has a counterpart of the same label' in line, line
    assert line.endswith(': equal'), line


def test_a_trace_that_does_not_generalise_is_caught(monkeypatch, tmp_path, image):
    """Without the by-factor upsampling, mmseg's FPNHead upsamples to the traced size at
    any input size: the tool must report the difference and fail."""
    written = write_model('fpn', tmp_path)
    monkeypatch.setattr(export_onnx, 'traceable_upsampling',
                        lambda model: contextlib.nullcontext())
    stdout, message = run_tool([written.config, written.checkpoint,
                                str(tmp_path / 'fpn.onnx'), '--shape', '64', '64'])
    assert message is not None and 'does not reproduce PyTorch' in message
    assert table_rows(stdout)[0][1] > TOLERANCE


def pytorch_result(exported, image_path):
    """PyTorch's own prediction for the image, and the network input it used."""
    from mmengine.registry import DefaultScope
    with torch.no_grad(), DefaultScope.overwrite_default_scope(exported.scope):
        batch, samples = export_onnx.prepared_image(exported.cfg, exported.model, image_path)
        return exported.model.predict(batch, samples)[0], batch


def test_example_equals_mmdet_and_mmseg_post_processing(exported, image):
    import cv2
    session, meta = example.load(exported.onnx)
    pixels = cv2.imread(image)
    batch, image_shape, scale = example.preprocess(pixels, meta)
    expected, expected_batch = pytorch_result(exported, image)
    assert batch.shape == tuple(expected_batch.shape)
    assert np.abs(batch - expected_batch.numpy()).max() < 1e-4
    outputs = session.run(None, {'image': batch})
    if exported.kind == 'fpn':
        label_map = example.segment(outputs[0], image_shape, pixels.shape[:2])
        want = expected.pred_sem_seg.data[0].numpy()
        assert label_map.shape == want.shape
        assert (label_map == want).mean() > 0.999  # bilinear in cv2 and torch: float rounding
        assert len(np.unique(want)) > 1
        return
    boxes, scores, labels = example.detect(outputs, meta, image_shape, scale)
    want = expected.pred_instances
    assert len(boxes) == len(want) > 0
    pairs = export_onnx.pair_detections((want.bboxes, want.scores, want.labels),
                                        (boxes, scores, labels), TOLERANCE * max(pixels.shape))
    assert pairs is not None and sorted(pairs) == list(range(len(boxes)))


def test_example_runs_as_a_script(exported, image, tmp_path):
    out = tmp_path / 'labels.png'
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools/examples/onnx_inference.py'),
                             exported.onnx, image, '--score-thr', '0.5', '--out', str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if exported.kind == 'fpn':
        assert result.stdout.startswith('Label map 120x160, classes present: ')
        assert out.exists()
    else:
        lines = result.stdout.splitlines()
        shown = int(lines[0].split(', ')[1].split()[0])
        assert shown == len(lines) - 1 > 0
        assert all(float(line.split()[0]) >= 0.5 for line in lines[1:])


def test_refusals_are_one_line(tmp_path):
    written = write_model('retinanet', tmp_path)
    _, message = run_tool([osp.join(ROOT, 'configs/detection/mask_rcnn_convmlp_s_coco.py'),
                           written.checkpoint, str(tmp_path / 'x.onnx')])
    assert message.startswith('export_onnx.py: error: MaskRCNN: only single-stage')
    fpn_weights = tmp_path / 'fpn_weights.pth'
    torch.save({'state_dict': {'backbone.tokenizer.block.0.weight': torch.zeros(1)}},
               fpn_weights)
    _, message = run_tool([written.config, str(fpn_weights), str(tmp_path / 'x.onnx')])
    assert 'does not fit the config' in message and '\n' not in message
    _, message = run_tool([written.config, written.checkpoint, str(tmp_path / 'x.onnx'),
                           '--shape', '64', '64', '--opset', '5'])
    assert message.startswith('export_onnx.py: error: torch.onnx.export failed at opset 5: ')
    assert '\n' not in message
    _, message = run_tool([written.config, str(tmp_path / 'missing.pth'),
                           str(tmp_path / 'x.onnx')])
    assert message == f'export_onnx.py: error: {tmp_path / "missing.pth"}: no such checkpoint file.'
