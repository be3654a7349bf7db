"""One clear message for a bad input met while running: a checkpoint of another model given
to tools/test.py, a damaged or missing image, a truncated annotation file, annotations of
unknown categories or none at all, a checkpoint URL that never answers."""
import os.path as osp

import pytest
import torch

from mmconvmlp.datasets import write_shapes_dataset
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
