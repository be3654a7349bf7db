"""tools/infer.py, mmdet's DetInferencer and mmseg's MMSegInferencer with our demo configs and
checkpoints written as our tools write them, and tools/demo_pictures.py's prediction grid, on
a tiny shapes data set (96x96 images)."""
import importlib.util
import json
import os
import os.path as osp
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmconvmlp.datasets import write_shapes_dataset
from random_weights import randomize_

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_shapes.py')
SEM_FPN = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_shapes.py')
COCO_VAL = 'data/shapes/coco/val2017'
ADE_VAL = 'data/shapes/ade/ADEChallengeData2016/images/validation'
SCORE_THR = 0.9  # draws a few of the random detector's boxes (drawing is slow)


def load_script(name):
    spec = importlib.util.spec_from_file_location(
        'script_' + name, osp.join(ROOT, 'tools', name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infer = load_script('infer')


def write_checkpoint(config, path):
    """A checkpoint of the config's model with seeded random weights, as tools/train.py writes
    one (mmengine's save_checkpoint: meta with the dataset's classes, the weights, and the
    message hub, whose HistoryBuffers torch's safe loading refuses unless mmconvmlp allows
    them). The detector's classifier is scaled by half: the top scores spread between 0.85
    and 0.95 instead of saturating in ties or staying near 0.5."""
    from mmengine.config import Config
    from mmengine.logging import MessageHub
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.runner import save_checkpoint, weights_to_cpu
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = randomize_(MODELS.build(cfg.model))
    state = weights_to_cpu(model.state_dict())
    if 'bbox_head.retina_cls.weight' in state:
        state['bbox_head.retina_cls.weight'] *= 0.5
    hub = MessageHub.get_instance('test_infer')
    hub.update_scalar('train/loss', 1.0)
    meta = dict(epoch=1, iter=1, dataset_meta=dict(cfg.train_dataloader.dataset.metainfo))
    save_checkpoint(dict(meta=meta, state_dict=state, message_hub=hub.state_dict()), str(path))
    return str(path)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """(folder holding data/shapes, detector checkpoint, segmentor checkpoint)."""
    root = tmp_path_factory.mktemp('infer')
    write_shapes_dataset(str(root / 'data' / 'shapes'), num_train=1, num_val=2, image_size=96,
                         seed=0)
    return (root, write_checkpoint(RETINANET, root / 'retinanet.pth'),
            write_checkpoint(SEM_FPN, root / 'fpn.pth'))


@pytest.fixture(scope='module')
def folder_run(workspace):
    """tools/infer.py on the folder of detection validation images, in float32 (the tests
    that compare it with other tools need one precision whatever the machine): its output
    folder."""
    root, detector, _ = workspace
    out = root / 'folder_run'
    infer.main([RETINANET, detector, str(root / COCO_VAL), '--out-dir', str(out),
                '--score-thr', str(SCORE_THR), '--precision', 'float32'])
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def as_rows(labels, scores, bboxes):
    """Detections as rows (label, score, x1, y1, x2, y2), sorted, for order-free comparison."""
    rows = np.column_stack([np.asarray(labels, float), np.asarray(scores, float),
                            np.asarray(bboxes, float).reshape(-1, 4)])
    return rows[np.lexsort(rows.T[::-1])]


def test_folder_gives_a_picture_and_a_json_per_image(workspace, folder_run):
    import mmcv
    root = workspace[0]
    names = sorted(os.listdir(root / COCO_VAL))
    assert sorted(os.listdir(folder_run / 'vis')) == names
    for name in names:
        image = mmcv.imread(str(root / COCO_VAL / name))
        picture = mmcv.imread(str(folder_run / 'vis' / name))
        assert picture.shape == image.shape
        assert np.abs(picture.astype(int) - image).mean() > 1  # boxes and labels drawn
        prediction = read_json(folder_run / 'preds' / (osp.splitext(name)[0] + '.json'))
        assert prediction['image'] == str(root / COCO_VAL / name)
        assert max(prediction['scores']) > SCORE_THR
        assert len(prediction['bboxes']) == len(prediction['labels']) \
            == len(prediction['label_names']) > 0
        assert set(prediction['label_names']) <= {'circle', 'triangle', 'square', 'star'}


def test_json_boxes_equal_test_py_out(workspace, folder_run):
    """The same checkpoint on the same images: tools/test.py --out saves what infer.py's
    JSON holds (labels, scores, boxes in pixels of the input image)."""
    root, detector, _ = workspace
    # one thread, as the in-process inference (tests/conftest.py): the same sums in the same order
    env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'test.py'), RETINANET, detector,
         '--out', 'test_out.pkl', '--work-dir', 'test_work_dir',
         '--precision', 'float32',  # as folder_run: auto's timing probe may choose apart
         '--cfg-options', 'test_dataloader.batch_size=1'],
        cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / 'test_out.pkl', 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 2
    for result in results:
        name = osp.splitext(osp.basename(result['img_path']))[0]
        prediction = read_json(folder_run / 'preds' / (name + '.json'))
        instances = result['pred_instances']
        expected = as_rows(instances['labels'], instances['scores'], instances['bboxes'])
        found = as_rows(prediction['labels'], prediction['scores'], prediction['bboxes'])
        assert found.shape == expected.shape and len(found) > 0
        np.testing.assert_allclose(found, expected, atol=1e-3)


def test_image_and_video(workspace, tmp_path, capsys):
    """One image gives one picture and JSON; a video gives a video of the same size and
    frame count with the predictions drawn, and one JSON with a prediction per frame."""
    import cv2
    import mmcv
    root, detector, _ = workspace
    image = root / COCO_VAL / sorted(os.listdir(root / COCO_VAL))[0]
    infer.main([RETINANET, detector, str(image), '--out-dir', str(tmp_path / 'image'),
                '--score-thr', str(SCORE_THR)])
    assert os.listdir(tmp_path / 'image' / 'vis') == [image.name]
    assert os.listdir(tmp_path / 'image' / 'preds') == [image.stem + '.json']
    assert f'{tmp_path / "image" / "vis"} (1 images)' in capsys.readouterr().out

    video = str(tmp_path / 'clip.mp4')
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'mp4v'), 5, (96, 96))
    for name in sorted(os.listdir(root / COCO_VAL)) * 2:
        writer.write(mmcv.imread(str(root / COCO_VAL / name)))
    writer.release()
    infer.main([RETINANET, detector, video, '--out-dir', str(tmp_path / 'video'),
                '--score-thr', '1.01'])
    drawn = mmcv.VideoReader(str(tmp_path / 'video' / 'vis' / 'clip.mp4'))
    assert (drawn.frame_cnt, drawn.width, drawn.height) == (4, 96, 96)
    frames = read_json(tmp_path / 'video' / 'preds' / 'clip.json')['frames']
    assert len(frames) == 4 and all(len(f['bboxes']) == len(f['scores']) > 0 for f in frames)
    assert 'clip.mp4 (4 frames)' in capsys.readouterr().out


def test_inferencers_predict_with_our_configs_and_checkpoints(workspace, folder_run,
                                                               tmp_path):
    """mmdet's DetInferencer and mmseg's MMSegInferencer, as users call them, load our
    checkpoints (message hub included) and predict what infer.py wrote."""
    from mmdet.apis import DetInferencer
    from mmseg.apis import MMSegInferencer
    root, detector, segmentor = workspace
    state = torch.load(detector, map_location='cpu')['state_dict']  # safe loading stays on

    image = str(root / COCO_VAL / sorted(os.listdir(root / COCO_VAL))[0])
    det = DetInferencer(model=RETINANET, weights=detector, show_progress=False)
    torch.testing.assert_close(det.model.state_dict()['bbox_head.retina_cls.weight'].cpu(),
                               state['bbox_head.retina_cls.weight'])
    found = det(image)['predictions'][0]
    expected = read_json(folder_run / 'preds' / (osp.splitext(osp.basename(image))[0] + '.json'))
    # infer.py runs ConvMLP's CPU layer (bands, folded BatchNorms), which rounds unlike the
    # plain network by about 1e-6 relative: 1e-4 pixels after the boxes' decoding.
    np.testing.assert_allclose(as_rows(found['labels'], found['scores'], found['bboxes']),
                               as_rows(expected['labels'], expected['scores'],
                                       expected['bboxes']), atol=1e-3)

    import mmcv
    image = str(root / ADE_VAL / sorted(os.listdir(root / ADE_VAL))[0])
    label_map = MMSegInferencer(model=SEM_FPN, weights=segmentor)(image)['predictions']
    assert label_map.shape == (96, 96)
    infer.main([SEM_FPN, segmentor, image, '--out-dir', str(tmp_path), '--precision', 'float32'])
    stem = osp.splitext(osp.basename(image))[0]
    written = mmcv.imread(str(tmp_path / 'preds' / (stem + '.png')), 'unchanged')
    np.testing.assert_array_equal(written, label_map)
    classes, counts = np.unique(label_map, return_counts=True)
    names = ('background', 'circle', 'triangle', 'square', 'star')
    assert read_json(tmp_path / 'preds' / (stem + '.json'))['pixels'] == {
        names[c]: int(n) for c, n in zip(classes, counts)}
    assert (tmp_path / 'vis' / osp.basename(image)).is_file()


@pytest.mark.parametrize('case', ['missing input', 'unreadable image', 'unknown extension',
                                  'empty folder', 'missing config', 'missing checkpoint',
                                  'checkpoint of another model', 'no CUDA'])
def test_bad_inputs_stop_with_a_message_naming_them(workspace, tmp_path, monkeypatch, case):
    root, detector, segmentor = workspace
    image = str(root / COCO_VAL / sorted(os.listdir(root / COCO_VAL))[0])
    bad = tmp_path / {'unreadable image': 'broken.jpg', 'unknown extension': 'notes.txt',
                      'empty folder': 'empty'}.get(case, 'missing.jpg')
    if case == 'empty folder':
        bad.mkdir()
    elif case != 'missing input':
        bad.write_text('no picture here')
    config, checkpoint, source, options = RETINANET, detector, image, []
    if case in ('missing input', 'unreadable image', 'unknown extension', 'empty folder'):
        source = str(bad)
    elif case == 'missing config':
        config = str(tmp_path / 'missing_config.py')
    elif case == 'missing checkpoint':
        checkpoint = str(tmp_path / 'missing.pth')
    elif case == 'checkpoint of another model':
        checkpoint = segmentor
    else:
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
        options = ['--device', 'cuda']
    expected = {'missing input': 'No such file or folder', 'unreadable image':
                'is not a readable image', 'unknown extension': "unknown extension '.txt'",
                'empty folder': 'holds no images', 'missing config': 'No such config file',
                'missing checkpoint': 'No such checkpoint file', 'checkpoint of another model':
                'does not fit the model of the config', 'no CUDA': 'CUDA is not available'}[case]
    named = {'missing config': config, 'checkpoint of another model': checkpoint,
             'missing checkpoint': checkpoint, 'no CUDA': '--device cuda'}.get(case, source)
    with pytest.raises(SystemExit) as stop:
        infer.main([config, checkpoint, source, '--out-dir', str(tmp_path / 'out'), *options])
    message = str(stop.value.code)
    assert message.startswith('infer.py: ') and expected in message and named in message


def test_unreadable_images_are_skipped_and_summed_up(workspace, tmp_path, monkeypatch):
    """A folder with a damaged image: the others are written, the run ends with status 1
    and the list of what it skipped; a folder of damaged images only sends no batch."""
    root, detector, _ = workspace
    folder = tmp_path / 'photos'
    folder.mkdir()
    for name in sorted(os.listdir(root / COCO_VAL)):
        (folder / name).write_bytes((root / COCO_VAL / name).read_bytes())
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not a JPEG')
    with pytest.raises(SystemExit) as stop:
        infer.main([RETINANET, detector, str(folder), '--out-dir', str(tmp_path / 'out'),
                    '--score-thr', '1.01'])
    assert str(stop.value.code) == (
        'infer.py: 1 of 3 images could not be read and were skipped (the other 2 were '
        f'written):\n  {folder / "broken.jpg"} is not a readable image.')
    assert sorted(os.listdir(tmp_path / 'out' / 'preds')) == sorted(
        osp.splitext(name)[0] + '.json' for name in os.listdir(root / COCO_VAL))

    for name in os.listdir(root / COCO_VAL):
        (folder / name).unlink()
    (folder / 'empty.png').write_bytes(b'')
    monkeypatch.setattr(infer, 'predict', lambda *_: pytest.fail('predict called'))
    with pytest.raises(SystemExit) as stop:
        infer.main([RETINANET, detector, str(folder), '--out-dir', str(tmp_path / 'out2')])
    assert str(stop.value.code).startswith('infer.py: none of the 2 images could be read:\n')


@pytest.mark.parametrize('case', ['a file', 'inside a file'])
def test_an_output_folder_that_cannot_be_written_is_named(workspace, tmp_path, case):
    root, detector, _ = workspace
    image = str(root / COCO_VAL / sorted(os.listdir(root / COCO_VAL))[0])
    blocker = tmp_path / 'results'
    blocker.write_text('a file')
    out = blocker if case == 'a file' else blocker / 'run1'
    with pytest.raises(SystemExit) as stop:
        infer.main([RETINANET, detector, image, '--out-dir', str(out)])
    message = str(stop.value.code)
    if case == 'a file':
        assert message == (f'infer.py: --out-dir {out} is a file, not a folder: give a '
                           'folder to write the results in.')
    else:
        assert message.startswith(f'infer.py: --out-dir {out} cannot be written (')
        assert message.endswith('): give a folder you can write to.')


@pytest.mark.parametrize('config', ['detector', 'segmentor'])
def test_a_huge_image_runs_at_the_model_size_and_answers_in_its_pixels(
        workspace, tmp_path, monkeypatch, config):
    """A 960x960 image for a model tested at 96x96: the model gets it shrunk to 192x192
    (twice its test size); the JSON's boxes and the label map are in the input's pixels."""
    import mmcv
    root, detector, segmentor = workspace
    folder = COCO_VAL if config == 'detector' else ADE_VAL
    small = mmcv.imread(str(root / folder / sorted(os.listdir(root / folder))[0]))
    big = tmp_path / 'big.png'
    mmcv.imwrite(small.repeat(10, 0).repeat(10, 1), str(big))
    seen = []
    predict = infer.predict
    monkeypatch.setattr(infer, 'predict', lambda model, image: seen.append(
        (image.shape, predict(model, image))) or seen[-1][1])
    out = tmp_path / 'out'
    infer.main([RETINANET if config == 'detector' else SEM_FPN,
                detector if config == 'detector' else segmentor, str(big),
                '--out-dir', str(out), '--score-thr', '1.01'])
    (shape, sample), = seen
    assert shape == (192, 192, 3)
    prediction = read_json(out / 'preds' / 'big.json')
    if config == 'detector':
        boxes = sample.pred_instances.bboxes.cpu().numpy()
        assert len(boxes) > 0
        np.testing.assert_allclose(prediction['bboxes'], boxes * 5, rtol=1e-5)
    else:
        written = mmcv.imread(str(out / 'preds' / 'big.png'), 'unchanged')
        assert written.shape == (960, 960)
        labels = sample.pred_sem_seg.data[0].cpu().numpy()
        np.testing.assert_array_equal(written[::5, ::5], labels)
        assert sum(prediction['pixels'].values()) == 960 * 960


def test_masks_of_a_shrunk_image_are_encoded_at_the_input_size():
    """Mask R-CNN's masks of a shrunk image, in COCO RLE at the input's size: the masks
    enlarged by nearest pixel (as OpenCV enlarges them), boxes scaled."""
    import types
    import cv2
    import pycocotools.mask as mask_util
    masks = np.zeros((3, 37, 53), bool)
    masks[0, 5:20, 10:30] = True
    masks[1] = np.random.default_rng(0).random((37, 53)) > 0.7  # masks[2] stays empty
    sample = types.SimpleNamespace(ori_shape=(37, 53), pred_instances=types.SimpleNamespace(
        masks=torch.from_numpy(masks)))
    prediction = dict(bboxes=[[5.3, 3.7, 53.0, 37.0]] * 3, masks=[None] * 3)
    infer.in_input_pixels(prediction, sample, (400, 300))
    np.testing.assert_allclose(prediction['bboxes'][0], [40, 30, 400, 300])
    for mask, encoded in zip(masks, prediction['masks']):
        expected = cv2.resize(mask.astype(np.uint8), (400, 300), interpolation=cv2.INTER_NEAREST)
        found = mask_util.decode(dict(size=encoded['size'], counts=encoded['counts'].encode()))
        np.testing.assert_array_equal(found, expected)


def test_bad_input_prints_one_line_without_traceback(workspace, tmp_path):
    root, detector, _ = workspace
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'infer.py'), RETINANET, detector,
         str(tmp_path / 'missing.jpg')], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert result.returncode == 1
    assert result.stderr.strip() == f'infer.py: No such file or folder: {tmp_path}/missing.jpg'


def test_demo_pictures_draw_ground_truth_beside_predictions(workspace, tmp_path, monkeypatch):
    """Each tile is mmdet's visualizer output for one enlarged validation image: the ground
    truth left, the predictions right; two tiles a row."""
    import mmcv
    root, detector, _ = workspace
    monkeypatch.chdir(root)  # the demo config's data_root is relative
    demo_pictures = load_script('demo_pictures')
    out = demo_pictures.draw_predictions(RETINANET, detector, str(tmp_path / 'grid.png'),
                                         num_images=2, score_thr=SCORE_THR)
    grid = mmcv.imread(out)
    side = 96 * demo_pictures.SCALE
    assert grid.shape == (side, 2 * (2 * side) + 12, 3)
    image = mmcv.imread(str(root / COCO_VAL / sorted(os.listdir(root / COCO_VAL))[0]))
    plain = image.repeat(demo_pictures.SCALE, 0).repeat(demo_pictures.SCALE, 1).astype(int)
    ground_truth, prediction = grid[:, :side], grid[:, side:2 * side]
    assert np.abs(ground_truth - plain).mean() > 1 and np.abs(prediction - plain).mean() > 1
    assert np.abs(ground_truth.astype(int) - prediction).mean() > 1
