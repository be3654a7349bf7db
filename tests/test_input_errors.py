"""One clear message for a bad input met while running: a checkpoint of another model given
to tools/test.py, a damaged or missing image, a truncated annotation file, annotations of
unknown categories or none at all, boxes and polygons mmdet leaves out, an image listed
twice, label maps of another size or with labels beyond the classes, a checkpoint URL that
never answers or a timeout setting that is no number, a --cfg-options key that is a typo."""
import json
import logging
import os.path as osp
import socket
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from mmengine.config import Config

from mmconvmlp.datasets import write_shapes_dataset
from mmconvmlp.engine import CheckpointDownloadError, ConvMLPRunner, DownloadSettingError
from mmconvmlp.engine.command_line import likely_typos
from mmconvmlp.engine.data_errors import DataFileError, check_contents
from mmconvmlp.engine.weights_fit import WeightsMismatchError
from mmconvmlp.models import ConvMLP
from test_tools import ROOT, load_script

RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_shapes.py')
MASK_RCNN = osp.join(ROOT, 'configs/detection/mask_rcnn_convmlp_s_shapes.py')
SEM_FPN = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_shapes.py')
SMALL = ['train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False', 'val_dataloader.persistent_workers=False',
         'train_dataloader.batch_size=2', 'val_dataloader.batch_size=2',
         'train_cfg.max_epochs=1', 'optim_wrapper.precision=float32',
         'train_dataloader.dataset.pipeline.2.scale=(64,64)',
         'val_dataloader.dataset.pipeline.1.scale=(64,64)']


@pytest.fixture
def shapes(tmp_path, monkeypatch):
    """A folder holding data/shapes (4 training and 2 validation images), made current."""
    write_shapes_dataset(str(tmp_path / 'data' / 'shapes'), num_train=4, num_val=2,
                         image_size=64, seed=0)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_test_py_refuses_a_checkpoint_of_another_model(shapes):
    """A ConvMLP-M backbone's weights for RetinaNet + ConvMLP-S: an error listing the
    missing and mis-shaped weights instead of an evaluation at mAP 0.000."""
    weights = {f'backbone.{k}': v for k, v in ConvMLP('m').state_dict().items()}
    checkpoint = shapes / 'other.pth'
    torch.save(dict(state_dict=weights), checkpoint)
    test_tool = load_script('tools/test.py')
    with pytest.raises(WeightsMismatchError) as error:
        test_tool.main([RETINANET, str(checkpoint), '--work-dir', str(shapes / 'work'),
                        '--cfg-options', *SMALL])
    message = str(error.value)
    assert message.startswith(f'{checkpoint} does not fit the model of the config')
    assert ' missing (e.g. neck.' in message
    assert 'with another shape (e.g. backbone.' in message
    assert not list(shapes.glob('work/*/*.json'))  # no metrics written


@pytest.fixture
def silent_server():
    """The URL of a local server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(4)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.getsockname()[1]}/convmlp_s.pth'
    for connection, _ in accepted:
        connection.close()
    server.close()


@pytest.fixture
def quick_downloads(tmp_path, monkeypatch):
    """Downloads into tmp_path/torch, straight to the server (no proxy), given up after
    0.5 s of silence."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('MMCONVMLP_DOWNLOAD_TIMEOUT', '0.5')
    for proxy in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy',
                  'ALL_PROXY'):
        monkeypatch.delenv(proxy, raising=False)


def test_a_silent_checkpoint_url_times_out_and_leaves_no_file(silent_server, tmp_path,
                                                              quick_downloads):
    backbone = ConvMLP('s', init_cfg=dict(type='Pretrained', checkpoint=silent_server))
    with pytest.raises(CheckpointDownloadError) as error:
        backbone.init_weights()
    assert str(error.value).startswith(
        f'{silent_server}: the server sent nothing for 0.5 s, so the download was given up')
    assert [p for p in (tmp_path / 'torch').rglob('*') if p.is_file()] == []


@pytest.mark.parametrize('scheme', ['torchvision://resnet50', 'open-mmlab://resnet50_v1c',
                                    'openmmlab://old_name', 'mmcls://resnet50'])
def test_a_model_zoo_checkpoint_downloads_with_the_timeout_too(silent_server, quick_downloads,
                                                               monkeypatch, scheme):
    """A model zoo's name (the stock configs' ResNet weights) resolves to its URL, which is
    downloaded with the timeout as an http(s) one is."""
    from mmengine.runner import CheckpointLoader
    from mmengine.runner import checkpoint as zoo
    monkeypatch.setattr(zoo, 'get_torchvision_models', lambda: {'resnet50': silent_server})
    monkeypatch.setattr(zoo, 'get_external_models', lambda: {'resnet50_v1c': silent_server})
    monkeypatch.setattr(zoo, 'get_deprecated_model_names', lambda: {'old_name': 'resnet50_v1c'})
    monkeypatch.setattr(zoo, 'get_mmcls_models', lambda: {'resnet50': silent_server})
    raised = []

    def load():  # in a thread, so that a download without the timeout fails the test
        try:
            CheckpointLoader.load_checkpoint(scheme)
        except Exception as error:  # noqa: BLE001 (checked below)
            raised.append(error)
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), f'{scheme}: the download hangs'
    (error,) = raised
    assert isinstance(error, CheckpointDownloadError), error
    assert str(error).startswith(f'{silent_server}: the server sent nothing for 0.5 s')


def train_with(shapes, *options):
    train_tool = load_script('tools/train.py')
    train_tool.main([RETINANET, '--work-dir', str(shapes / 'work'), '--cfg-options', *SMALL,
                     *options])


@pytest.mark.parametrize('case', ['damaged image, in a worker', 'missing image',
                                  'truncated annotation file'])
def test_an_unusable_data_file_is_named(shapes, case):
    """tools/train.py (what MMDetection's own train.py builds too): DataFileError, whose
    message alone is printed; nothing trained."""
    coco = shapes / 'data' / 'shapes' / 'coco'
    image = 'data/shapes/coco/train2017/000000000001.jpg'
    annotations = 'data/shapes/coco/annotations/instances_train2017.json'
    options = []
    if case == 'damaged image, in a worker':
        (shapes / image).write_bytes(b'\xff\xd8 not a JPEG')
        options = ['train_dataloader.num_workers=1']
        expected = f'{image} cannot be read: it is no readable image'
    elif case == 'missing image':
        (shapes / image).unlink()
        expected = f'{image} cannot be read: no such file. The annotations list it'
    else:
        text = (coco / 'annotations' / 'instances_train2017.json').read_text()
        (shapes / annotations).write_text(text[:len(text) // 2])
        expected = f'{annotations} cannot be read as JSON (Expecting value: line 1 column'
    with pytest.raises(DataFileError) as error:
        train_with(shapes, *options)
    assert str(error.value).startswith(expected)
    assert not list(shapes.glob('work/*.pth'))


def built_dataset(section):
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(RETINANET)
    return DATASETS.build(cfg[section].dataset)


def rewrite_annotations(path, change):
    with open(path) as f:
        coco = json.load(f)
    change(coco)
    with open(path, 'w') as f:
        json.dump(coco, f)


@contextmanager
def logged_warnings():
    """The warnings mmengine's current logger prints meanwhile (through the real
    print_log, whose level must be a number)."""
    from mmengine.logging import MMLogger
    found = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno == logging.WARNING:
                found.append(record.getMessage())

    logger, handler = MMLogger.get_current_instance(), Keep()
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


def test_annotations_of_unknown_categories_are_counted(shapes):
    """A warning with the counts; where all are unknown, no training image is left."""
    path = shapes / 'data/shapes/coco/annotations/instances_train2017.json'

    def unknown_first_two(coco):
        for ann in coco['annotations'][:2]:
            ann['category_id'] = 99

    rewrite_annotations(path, unknown_first_two)
    total = len(json.loads(path.read_text())['annotations'])
    with logged_warnings() as warnings:
        check_contents(built_dataset('train_dataloader'), 'train on')
    assert warnings == [f'{path.relative_to(shapes)}: 2 of {total} annotations have category '
                        "ids that are not among the config's classes (99) and are left out."]

    def all_unknown(coco):
        for ann in coco['annotations']:
            ann['category_id'] = 99

    rewrite_annotations(path, all_unknown)
    with pytest.raises(DataFileError) as error:
        train_with(shapes)
    assert str(error.value).startswith(f'{path.relative_to(shapes)}: the data set holds no '
                                       'samples, nothing to train on')


def test_boxes_mmdet_leaves_out_are_counted(shapes):
    """Boxes of zero or negative size and boxes wholly outside their image (CocoDataset
    drops them without a word), and boxes reaching outside it (kept)."""
    path = shapes / 'data/shapes/coco/annotations/instances_train2017.json'

    def spoil(coco):
        anns = coco['annotations']
        anns[0]['bbox'][2] = 0                      # no width
        anns[1]['bbox'][3] = -5                     # negative height
        anns[2]['bbox'][:2] = [500, 500]            # beyond a 64x64 image
        anns[3]['bbox'] = [50, 10, 30, 20]          # reaches past the right edge

    rewrite_annotations(path, spoil)
    coco = json.loads(path.read_text())
    total = len(coco['annotations'])
    name = path.relative_to(shapes)
    with logged_warnings() as warnings:
        check_contents(built_dataset('train_dataloader'), 'train on')
    assert warnings == [
        f'{name}: 2 of {total} boxes are under a pixel wide or high (or of area 0) and 1 lie '
        f'wholly outside their image (e.g. annotation id {coco["annotations"][0]["id"]}): '
        'mmdet leaves them out.',
        f'{name}: 1 of {total} boxes reach more than a pixel outside their image (e.g. '
        f'annotation id {coco["annotations"][3]["id"]}); they are kept as given.']


def test_invalid_polygons_are_counted(shapes):
    """Mask R-CNN's LoadAnnotations leaves out polygons with an odd number of coordinates or
    fewer than 3 points, and ignores an instance left without one."""
    path = shapes / 'data/shapes/coco/annotations/instances_train2017.json'
    first = {}

    def spoil(coco):
        anns = coco['annotations']
        anns[0]['segmentation'] = [anns[0]['segmentation'][0][:-1]]    # odd
        anns[1]['segmentation'] = [[1, 1, 5, 5]] + anns[1]['segmentation']  # 2 points
        first.update(image=next(i['file_name'] for i in coco['images']
                                if i['id'] == anns[0]['image_id']))

    rewrite_annotations(path, spoil)
    polygons = sum(len(a['segmentation']) for a in json.loads(path.read_text())['annotations'])
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    dataset = DATASETS.build(Config.fromfile(MASK_RCNN).train_dataloader.dataset)
    with logged_warnings() as warnings:
        check_contents(dataset, 'train on')
    assert len(warnings) == 1
    assert warnings[0].startswith(f'{path.relative_to(shapes)}: 2 of {polygons} polygons have '
                                  'an odd number of coordinates or fewer than 3 points (e.g. '
                                  f'in data/shapes/coco/train2017/{first["image"]})')
    assert warnings[0].endswith("LoadAnnotations leaves out; 1 instances keep no polygon "
                                'and are ignored.')


def test_an_image_listed_twice_stops_the_run(shapes):
    path = shapes / 'data/shapes/coco/annotations/instances_val2017.json'

    def repeat(coco):
        again = dict(coco['images'][0], id=max(i['id'] for i in coco['images']) + 1)
        coco['images'].append(again)
        coco['annotations'].append(dict(coco['annotations'][0], image_id=again['id'],
                                        id=max(a['id'] for a in coco['annotations']) + 1))

    rewrite_annotations(path, repeat)
    with pytest.raises(DataFileError) as error:
        check_contents(built_dataset('val_dataloader'), 'validate on')
    assert str(error.value).startswith(
        f'{path.relative_to(shapes)}: 1 images are listed more than once (e.g. '
        'data/shapes/coco/val2017/')


@pytest.mark.parametrize('case', ['another size', 'labels beyond the classes'])
def test_a_wrong_label_map_is_named(shapes, case):
    """tools/train.py on the segmentation demo: one label map of the first batch is wrong;
    the error of the loss becomes one message naming that file."""
    from PIL import Image
    folder = shapes / 'data/shapes/ade/ADEChallengeData2016/annotations/training'
    wrong = sorted(folder.iterdir())[0]
    labels = np.asarray(Image.open(wrong))
    if case == 'another size':
        Image.fromarray(labels[:48]).save(wrong)
        expected = f'{wrong.relative_to(shapes)}: its label map is 64x48 pixels, but its image '
    else:
        labels = labels.copy()
        labels[:4, :4] = 40
        Image.fromarray(labels).save(wrong)
        expected = (f'{wrong.relative_to(shapes)} holds labels 39 (after reduce_zero_label '
                    'subtracts 1), but the config has 5 classes')
    train_tool = load_script('tools/train.py')
    with pytest.raises(DataFileError) as error:
        train_tool.main([SEM_FPN, '--work-dir', str(shapes / 'work'), '--cfg-options',
                         'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
                         'train_dataloader.persistent_workers=False',
                         'val_dataloader.persistent_workers=False',
                         'train_dataloader.batch_size=4', 'train_cfg.max_iters=1'])
    assert str(error.value).startswith(expected), str(error.value)


@pytest.mark.parametrize('value', ['abc', '-1', '0', 'inf'])
def test_a_download_timeout_that_is_no_number_is_named(tmp_path, monkeypatch, value):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('MMCONVMLP_DOWNLOAD_TIMEOUT', value)
    backbone = ConvMLP('s', init_cfg=dict(type='Pretrained',
                                          checkpoint='http://127.0.0.1:9/convmlp_s.pth'))
    with pytest.raises(DownloadSettingError) as error:
        backbone.init_weights()
    assert str(error.value).startswith(f"MMCONVMLP_DOWNLOAD_TIMEOUT='{value}': give the "
                                       'seconds a checkpoint download waits')


def test_a_cfg_options_typo_is_named_and_new_keys_are_not():
    cfg = Config.fromfile(RETINANET).to_dict()
    options = {'train_cfgg.max_epochs': 3, 'train_cfg.max_epoch': 3, 'randomness.seed': 0,
               'train_cfg.max_epochs': 2, 'model.backbone.arch': 'm',
               'train_dataloader.dataset.pipeline.2.scales': (64, 64),
               'custom_setting': 1}
    assert likely_typos(cfg, options) == [
        '--cfg-options train_cfgg.max_epochs: the config has no train_cfgg; did you mean '
        'train_cfg? It is added as a new key, which nothing may read.',
        '--cfg-options train_cfg.max_epoch: the config has no train_cfg.max_epoch; did you '
        'mean train_cfg.max_epochs? It is added as a new key, which nothing may read.',
        '--cfg-options train_dataloader.dataset.pipeline.2.scales: the config has no '
        'train_dataloader.dataset.pipeline.2.scales; did you mean '
        'train_dataloader.dataset.pipeline.2.scale? It is added as a new key, which nothing '
        'may read.']


def test_train_py_warns_about_a_cfg_options_typo(shapes):
    with logged_warnings() as warnings:
        with pytest.raises(DataFileError):  # stops right after the options, with no data
            (shapes / 'data/shapes/coco/annotations/instances_train2017.json').write_text('{')
            train_with(shapes, 'train_cfgg.max_epochs=3')
    assert any(w.startswith('--cfg-options train_cfgg.max_epochs: the config has no '
                            'train_cfgg; did you mean train_cfg?') for w in warnings)


def test_a_split_without_annotations_is_nothing_to_evaluate(shapes):
    path = shapes / 'data/shapes/coco/annotations/instances_val2017.json'
    rewrite_annotations(path, lambda coco: coco.update(annotations=[]))
    cfg = Config.fromfile(RETINANET)
    cfg.work_dir = str(shapes / 'work')
    cfg.test_dataloader.update(num_workers=0, persistent_workers=False)
    runner = ConvMLPRunner.from_cfg(cfg)
    with pytest.raises(DataFileError) as error:
        runner.test()
    assert str(error.value).startswith(
        f'{path.relative_to(shapes)}: none of its 2 images has an annotation of the config\'s '
        'classes, nothing to test on')
