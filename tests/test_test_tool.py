"""tools/test.py with only the validation data at hand: --show-dir of a segmentation config
(mmseg 1.2.2's visualization hook reads runner.iter) and --precision, in this process."""
import glob
import importlib.util
import os.path as osp
import shutil

import pytest
import torch
from mmengine.config import Config

from mmconvmlp.config_models import build_config_model
from mmconvmlp.datasets.shapes import write_shapes_dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEGMENTOR = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_shapes.py')
DETECTOR = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_shapes.py')


def load_test_tool():
    spec = importlib.util.spec_from_file_location('test_tool', osp.join(ROOT, 'tools/test.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def validation_only(tmp_path_factory):
    """A folder whose data/shapes holds the validation split alone."""
    root = tmp_path_factory.mktemp('validation_only')
    write_shapes_dataset(str(root / 'data' / 'shapes'), num_train=1, num_val=2, image_size=64)
    shutil.rmtree(root / 'data' / 'shapes' / 'ade' / 'ADEChallengeData2016' / 'images' /
                  'training')
    (root / 'data' / 'shapes' / 'coco' / 'annotations' / 'instances_train2017.json').unlink()
    return root


def checkpoint(config, path):
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    torch.save(dict(meta=dict(), state_dict=build_config_model(cfg).state_dict()), path)
    return str(path)


def test_show_dir_of_a_segmentor_needs_no_training_data(validation_only, monkeypatch):
    monkeypatch.chdir(validation_only)
    weights = checkpoint(SEGMENTOR, validation_only / 'segmentor.pth')
    metrics = load_test_tool().main([SEGMENTOR, weights, '--work-dir', 'test_seg',
                                '--show-dir', 'drawn'])
    drawn = glob.glob(str(validation_only / 'test_seg' / '*' / 'drawn' / '**' / '*.png'),
                      recursive=True) + glob.glob(str(validation_only / 'drawn' / '**' /
                                                      '*.png'), recursive=True)
    assert len(drawn) == 2, drawn
    assert 'mIoU' in metrics


def test_precision_auto_on_a_cpu_with_bfloat16_units(validation_only, monkeypatch):
    """The same detections' metrics in float32 and, where bfloat16 is native (simulated),
    in bfloat16; the log names the choice."""
    import mmconvmlp.engine.precision as training_precision
    monkeypatch.chdir(validation_only)
    monkeypatch.setattr(training_precision, 'cpu_bfloat16_speed', lambda: 0.4)
    weights = checkpoint(DETECTOR, validation_only / 'detector.pth')
    tool = load_test_tool()
    float32 = tool.main([DETECTOR, weights, '--work-dir', 'test_f32'])
    bfloat16 = tool.main([DETECTOR, weights, '--work-dir', 'test_bf16', '--precision', 'auto'])
    assert set(float32) == set(bfloat16) and 'coco/bbox_mAP' in bfloat16
    (log,) = glob.glob(str(validation_only / 'test_bf16' / '*' / '*.log'))
    assert ('Inference precision: bfloat16 (auto: a bfloat16 probe ran 2.5x as fast as '
            'float32 on this CPU); backbone, neck and heads in bfloat16 autocast') in open(
                log).read()
