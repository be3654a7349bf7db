"""One clear message for a bad input met while running: a checkpoint of another model given
to tools/test.py, a damaged or missing image, a truncated annotation file, annotations of
unknown categories or none at all, a checkpoint URL that never answers."""
import json
import os.path as osp
import socket
import threading

import pytest
import torch
from mmengine.config import Config

from mmconvmlp.datasets import write_shapes_dataset
from mmconvmlp.engine import CheckpointDownloadError, ConvMLPRunner, data_errors
from mmconvmlp.engine.data_errors import DataFileError, check_contents
from mmconvmlp.engine.weights_fit import WeightsMismatchError
from mmconvmlp.models import ConvMLP
from test_tools import ROOT, load_script

RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_shapes.py')
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


def test_a_silent_checkpoint_url_times_out_and_leaves_no_file(silent_server, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('MMCONVMLP_DOWNLOAD_TIMEOUT', '0.5')
    for proxy in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy',
                  'ALL_PROXY'):
        monkeypatch.delenv(proxy, raising=False)
    backbone = ConvMLP('s', init_cfg=dict(type='Pretrained', checkpoint=silent_server))
    with pytest.raises(CheckpointDownloadError) as error:
        backbone.init_weights()
    assert str(error.value).startswith(
        f'{silent_server}: the server sent nothing for 0.5 s, so the download was given up')
    assert [p for p in (tmp_path / 'torch').rglob('*') if p.is_file()] == []


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


def test_annotations_of_unknown_categories_are_counted(shapes, monkeypatch):
    """A warning with the counts; where all are unknown, no training image is left."""
    path = shapes / 'data/shapes/coco/annotations/instances_train2017.json'
    warnings = []
    monkeypatch.setattr(data_errors, 'print_log', lambda text, **_: warnings.append(text))

    def unknown_first_two(coco):
        for ann in coco['annotations'][:2]:
            ann['category_id'] = 99

    rewrite_annotations(path, unknown_first_two)
    total = len(json.loads(path.read_text())['annotations'])
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
