"""Released COCO / ADE20K checkpoints (MMDetection 2.x / MMSegmentation 0.x layout): safe
loading, conversion, and the same outputs from the converted weights.

The real files cannot be downloaded here, so each test writes one in that layout: the
state dict of the model the repository's config builds, a ``meta`` holding objects that
``torch.load(weights_only=True)`` refuses, and an ``optimizer`` section."""
import copy
import os
import os.path as osp
import pickle
import runpy
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.runner import load_checkpoint

from mmconvmlp.checkpoints import (UnloadedGlobal, build_model_from_config,
                                   convert_released_checkpoint, infer_model,
                                   load_checkpoint_safely)
from mmconvmlp.models import CheckpointMismatchError
from random_weights import randomize_

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    'retinanet': osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_coco.py'),
    'mask_rcnn': osp.join(ROOT, 'configs/detection/mask_rcnn_convmlp_s_coco.py'),
    'fpn': osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_ade20k.py'),
}
CONVERTER = osp.join(ROOT, 'tools/model_converters/convert_released_checkpoint.py')


class OldConfig:
    """Stands for the mmcv 1.x ``Config`` object some old checkpoints pickle in ``meta``."""

    def __init__(self, text):
        self._text = text


class RunsACommand:
    """A pickle that, loaded with plain ``pickle``, would run a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def old_meta(extra=None):
    meta = dict(
        mmdet_version='2.11.0', mmcv_version='1.3.1', env_info='sys.platform: linux',
        config=OldConfig("model = dict(type='MaskRCNN')"), seed=np.int64(0), epoch=12,
        iter=87960, CLASSES=('person', 'bicycle'), PALETTE=[[120, 120, 120], [180, 120, 120]],
        hook_msgs=dict(last_ckpt='work_dirs/epoch_12.pth', best_score=np.float64(0.384)),
        img_norm_mean=np.array([123.675, 116.28, 103.53], dtype=np.float32))
    meta.update(extra or {})
    return meta


def write_released(path, state_dict, meta):
    """A checkpoint the way mmcv 1.x's save_checkpoint wrote it (torch.save, pickle
    protocol 2, zip format)."""
    optimizer = dict(state={0: dict(step=10, exp_avg=torch.zeros(3))},
                     param_groups=[dict(lr=1e-4, weight_decay=1e-4, params=[0])])
    torch.save(dict(meta=meta, state_dict=OrderedDict(state_dict), optimizer=optimizer), path)


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors(item)]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in tensors(obj[key])]
    return []


def outputs(family, model, image):
    """The raw head outputs (``mode='tensor'``) of a detector or segmentor."""
    model.eval()
    with torch.no_grad():
        if family == 'mask_rcnn':
            from mmdet.structures import DetDataSample
            shape = tuple(image.shape[-2:])
            sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape,
                                                 pad_shape=shape, batch_input_shape=shape,
                                                 scale_factor=(1.0, 1.0)))
            return tensors(model(image, [sample], mode='tensor'))
        return tensors(model(image, mode='tensor'))


@pytest.mark.parametrize('family', ['retinanet', 'mask_rcnn', 'fpn'])
def test_converted_checkpoint_gives_the_outputs_of_the_weights_put_in(tmp_path, family):
    config = CONFIGS[family]
    source = randomize_(build_model_from_config(config))
    src, dst = tmp_path / 'released.pth', tmp_path / 'converted.pth'
    write_released(src, source.state_dict(), old_meta())
    with pytest.raises(pickle.UnpicklingError):  # why the files need converting
        torch.load(src, map_location='cpu', weights_only=True)

    report = convert_released_checkpoint(str(src), str(dst))
    assert (report.family, report.arch, report.config, report.checked) == \
        (family, 's', config, True)
    assert report.unmapped == [] and report.dropped_classifier == []
    assert report.dropped_top_level == ['optimizer']
    assert 'numpy.dtype' in report.unloaded_globals
    assert f'{__name__}.OldConfig' in report.unloaded_globals

    converted = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(converted) == {'state_dict', 'meta'}
    meta = converted['meta']
    assert meta['dataset_meta'] == dict(classes=('person', 'bicycle'),
                                        palette=[[120, 120, 120], [180, 120, 120]])
    assert meta['mmdet_version'] == '2.11.0' and meta['epoch'] == 12
    assert meta['config'] == f'<not loaded: {__name__}.OldConfig>'
    # numeric numpy values are read back from their bytes, without numpy unpickling them
    assert meta['seed'] == 0 and meta['hook_msgs']['best_score'] == 0.384
    assert meta['img_norm_mean'] == pytest.approx([123.675, 116.28, 103.53])

    # what tools/test.py does (strictly here): load the checkpoint into the config's model;
    # a copy with other random weights stands for a freshly built one
    model = randomize_(copy.deepcopy(source), seed=3)
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    image = torch.randn(1, 3, 64, 64)
    expected, got = outputs(family, source, image), outputs(family, model, image)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_malicious_global_is_never_called(tmp_path, monkeypatch):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    write_released(path, {'neck.conv.weight': torch.ones(2)},
                   old_meta(dict(payload=RunsACommand(f'touch {marker}'),
                                 call=pickle.loads)))
    calls = []  # belt and braces: were os.system reached after all, it would only record
    monkeypatch.setattr(os, 'system', lambda command: calls.append(command))

    obj, unloaded = load_checkpoint_safely(str(path))
    assert not marker.exists() and calls == []
    assert {'posix.system', 'pickle.loads'} <= set(unloaded)
    payload = obj['meta']['payload']
    assert isinstance(payload, UnloadedGlobal) and payload.global_name == 'posix.system'
    assert payload.args == (f'touch {marker}',)
    torch.testing.assert_close(obj['state_dict']['neck.conv.weight'], torch.ones(2))

    dst = tmp_path / 'converted.pth'
    report = convert_released_checkpoint(str(path), str(dst), check=False)
    assert not marker.exists() and calls == []
    assert 'posix.system' in report.summary()
    meta = torch.load(dst, map_location='cpu', weights_only=True)['meta']
    assert meta['payload'] == '<not loaded: posix.system>'


def test_unmappable_entries_are_named_and_nothing_is_written(tmp_path, capsys):
    path, dst = tmp_path / 'odd.pth', tmp_path / 'out.pth'
    state = {'backbone.tokenizer.block.0.weight': torch.ones(1),
             'ema_backbone.tokenizer.block.0.weight': torch.ones(1),
             'neck.step': 3,
             'backbone.head.weight': torch.ones(1)}
    write_released(path, state, old_meta())
    converter = runpy.run_path(CONVERTER, run_name='converter')
    assert converter['main']([str(path), str(dst), '--no-check']) == 1
    err = capsys.readouterr().err
    assert 'ema_backbone.tokenizer.block.0.weight (not part of a detector or segmentor)' in err
    assert 'neck.step (a int, not a tensor)' in err
    assert not dst.exists()

    assert converter['main']([str(path), str(dst), '--no-check', '--allow-unmapped']) == 0
    out = capsys.readouterr().out
    assert 'ema_backbone.tokenizer.block.0.weight' in out and 'backbone.head.weight' in out
    converted = torch.load(dst, map_location='cpu', weights_only=True)
    assert list(converted['state_dict']) == ['backbone.tokenizer.block.0.weight']


def test_names_and_shapes_are_checked_against_the_config(tmp_path):
    source = build_model_from_config(CONFIGS['fpn'])
    state = source.state_dict()
    assert infer_model(state) == ('fpn', 's')
    del state['decode_head.conv_seg.weight']
    path = tmp_path / 'released.pth'
    write_released(path, state, old_meta())
    with pytest.raises(CheckpointMismatchError, match='decode_head.conv_seg.weight'):
        convert_released_checkpoint(str(path), str(tmp_path / 'out.pth'))
    wrong_arch = CONFIGS['fpn'].replace('_s_', '_m_')
    with pytest.raises(CheckpointMismatchError, match='shape mismatch') as error:
        convert_released_checkpoint(str(path), str(tmp_path / 'out.pth'), config=wrong_arch)
    assert 'backbone.stages.0.blocks.0.channel_mlp1.fc1.weight' in str(error.value)
    assert not (tmp_path / 'out.pth').exists()


def test_one_command_then_tools_test(tmp_path, capsys):
    """The documented route for a downloaded file: tools/test.py on it as downloaded says to
    convert it; the converter, then tools/test.py."""
    from mmconvmlp.datasets import write_shapes_dataset
    write_shapes_dataset(str(tmp_path / 'data'), num_train=1, num_val=1, image_size=64,
                         seed=0)
    source = randomize_(build_model_from_config(CONFIGS['fpn']))
    src, dst = tmp_path / 'sem_fpn_convmlp_s_ade20k.pth', tmp_path / 'converted.pth'
    write_released(src, source.state_dict(), old_meta())
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    refused = subprocess.run([sys.executable, osp.join(ROOT, 'tools/test.py'),
                              CONFIGS['fpn'], str(src), '--work-dir', str(tmp_path / 'work')],
                             **run)
    assert refused.returncode != 0
    assert 'convert_released_checkpoint.py' in refused.stderr, refused.stderr[-4000:]
    assert 'Traceback' not in refused.stderr

    converter = runpy.run_path(CONVERTER, run_name='converter')
    assert converter['main']([str(src), str(dst)]) == 0
    assert 'fpn_convmlp_s_ade20k.py' in capsys.readouterr().out

    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools/test.py'),
                             CONFIGS['fpn'], str(dst), '--work-dir', str(tmp_path / 'work')],
                            **run)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert 'mIoU' in log
    assert 'do not match exactly' not in log and 'missing keys' not in log


def test_numpy_values_of_numpy_1_pickles():
    """Files written under numpy 1.x name ``numpy.core.multiarray.*``; their numbers are
    read back all the same, and non-numeric dtypes are left as text."""
    from mmconvmlp.checkpoints import _placeholder, to_plain
    dtype = _placeholder('numpy.dtype')('f8', False, True)
    dtype.__setstate__((3, '<', None, None, None, -1, -1, 0))
    scalar = _placeholder('numpy.core.multiarray.scalar')(dtype, np.float64(0.25).tobytes())
    array = _placeholder('numpy.core.multiarray._reconstruct')(
        _placeholder('numpy.ndarray'), (0,), b'b')
    array.__setstate__((1, (2, 2), dtype, False, np.arange(4.).tobytes()))
    objects = _placeholder('numpy.dtype')('O8', False, True)
    odd = _placeholder('numpy.core.multiarray.scalar')(objects, b'\0' * 8)
    assert to_plain(dict(a=scalar, b=array, c=odd)) == dict(
        a=0.25, b=[[0.0, 1.0], [2.0, 3.0]], c='<not loaded: numpy.core.multiarray.scalar>')


def test_plain_metadata_loads_as_downloaded(tmp_path):
    """Names did not change, so a released file whose metadata holds only plain values and
    numpy numbers loads as downloaded, the way tools/test.py loads it (weights_only with
    the numpy globals it allows); strictly, with the same weights."""
    from mmconvmlp.runner_utils import checkpoint_globals
    source = randomize_(build_model_from_config(CONFIGS['fpn']))
    path = tmp_path / 'sem_fpn_convmlp_s_ade20k.pth'
    meta = old_meta()
    del meta['config']  # MMSegmentation 0.x stored the config as text
    write_released(path, source.state_dict(), meta)
    model = randomize_(copy.deepcopy(source), seed=3)
    with checkpoint_globals():
        load_checkpoint(model, str(path), map_location='cpu', strict=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name], rtol=0, atol=0)
