"""Released COCO / ADE20K checkpoints (MMDetection 2.x / MMSegmentation 0.x layout): safe
loading, conversion, and the same results from the converted weights.

The real files cannot be downloaded here, so the tests write them. :func:`released_state_dict`
lists the parameter names and shapes those releases wrote, from their module definitions (not
from today's model): the authors' ConvMLP (``src/convmlp.py``, ``src/utils/*.py`` of
SHI-Labs/Convolutional-MLPs, built with ``classifier_head=False``) and MMDetection 2.x /
MMSegmentation 0.x's FPN, RetinaHead, RPNHead, Shared2FCBBoxHead, FCNMaskHead and FPNHead with
the authors' configs (FPN ``in_channels`` of the backbone, the rest as in the mmdet 2.x /
mmseg 0.x base configs). :func:`released_meta` holds what those releases' training wrote into
``meta``. A naming difference between then and now would make the conversion's check fail."""
import os
import os.path as osp
import pickle
import re
import runpy
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.runner import load_checkpoint

from mmconvmlp.checkpoints import (UnloadedGlobal, convert_released_checkpoint, infer_model,
                                   load_checkpoint_safely)
from mmconvmlp.config_models import build_config_model
from mmconvmlp.models import CheckpointMismatchError

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    'retinanet': osp.join(ROOT, 'configs/detection/retinanet_convmlp_{}_coco.py'),
    'mask_rcnn': osp.join(ROOT, 'configs/detection/mask_rcnn_convmlp_{}_coco.py'),
    'fpn': osp.join(ROOT, 'configs/segmentation/fpn_convmlp_{}_ade20k.py'),
}
CONVERTER = osp.join(ROOT, 'tools/model_converters/convert_released_checkpoint.py')

#: The authors' ConvMLP variants (src/convmlp.py): blocks, dims, mlp_ratios, channels,
#: n_conv_blocks.
AUTHORS_ARCHS = {
    's': ((2, 4, 2), (128, 256, 512), (2, 2, 2), 64, 2),
    'm': ((3, 6, 3), (128, 256, 512), (3, 3, 3), 64, 3),
    'l': ((4, 8, 3), (192, 384, 768), (3, 3, 3), 96, 3),
}
COCO_CLASSES = ('person', 'bicycle', 'car')  # the first of the 80 (the files hold all 80)


def config(family, arch='s'):
    return CONFIGS[family].format(arch)


def batchnorm(prefix, channels):
    return {f'{prefix}.weight': (channels,), f'{prefix}.bias': (channels,),
            f'{prefix}.running_mean': (channels,), f'{prefix}.running_var': (channels,),
            f'{prefix}.num_batches_tracked': ()}


def conv(prefix, out_ch, in_ch, kernel, bias=True):
    shapes = {f'{prefix}.weight': (out_ch, in_ch, kernel, kernel)}
    if bias:
        shapes[f'{prefix}.bias'] = (out_ch,)
    return shapes


def linear(prefix, out_features, in_features):
    return {f'{prefix}.weight': (out_features, in_features), f'{prefix}.bias': (out_features,)}


def authors_backbone(arch):
    """The authors' ConvMLP without its classifier: ConvTokenizer, ConvStage, BasicStages."""
    blocks, dims, ratios, channels, conv_blocks = AUTHORS_ARCHS[arch]
    half = channels // 2
    shapes = {**conv('tokenizer.block.0', half, 3, 3, bias=False),
              **batchnorm('tokenizer.block.1', half),
              **conv('tokenizer.block.3', half, half, 3, bias=False),
              **batchnorm('tokenizer.block.4', half),
              **conv('tokenizer.block.6', channels, half, 3, bias=False),
              **batchnorm('tokenizer.block.7', channels)}
    for i in range(conv_blocks):
        block = f'conv_stages.conv_blocks.{i}'
        shapes.update({**conv(f'{block}.0', dims[0], channels, 1, bias=False),
                       **batchnorm(f'{block}.1', dims[0]),
                       **conv(f'{block}.3', dims[0], dims[0], 3, bias=False),
                       **batchnorm(f'{block}.4', dims[0]),
                       **conv(f'{block}.6', channels, dims[0], 1, bias=False),
                       **batchnorm(f'{block}.7', channels)})
    shapes.update(conv('conv_stages.downsample', dims[0], channels, 3))
    for stage, (n, dim, ratio) in enumerate(zip(blocks, dims, ratios)):
        hidden = int(dim * ratio)
        for j in range(n):
            block = f'stages.{stage}.blocks.{j}'
            for norm in ('norm1', 'norm2', 'connect_norm'):
                shapes.update({f'{block}.{norm}.weight': (dim,), f'{block}.{norm}.bias': (dim,)})
            for mlp in ('channel_mlp1', 'channel_mlp2'):
                shapes.update({**linear(f'{block}.{mlp}.fc1', hidden, dim),
                               **linear(f'{block}.{mlp}.fc2', dim, hidden)})
            shapes[f'{block}.connect.weight'] = (dim, 1, 3, 3)  # depthwise, no bias
        if stage < 2:
            shapes.update(conv(f'stages.{stage}.downsample_mlp.downsample', dims[stage + 1],
                               dim, 3))
    return shapes


def fpn(in_channels, start_level, extra_on_input):
    """mmdet 2.x / mmseg 0.x FPN (ConvModules without norm: ``.conv`` with bias), 256 out."""
    shapes = {}
    for k, ch in enumerate(in_channels[start_level:]):
        shapes.update(conv(f'lateral_convs.{k}.conv', 256, ch, 1))
        shapes.update(conv(f'fpn_convs.{k}.conv', 256, 256, 3))
    if extra_on_input:  # RetinaNet: 5 outputs, two stride-2 convs, the first on the input
        levels = len(in_channels) - start_level
        shapes.update(conv(f'fpn_convs.{levels}.conv', 256, in_channels[-1], 3))
        shapes.update(conv(f'fpn_convs.{levels + 1}.conv', 256, 256, 3))
    return shapes


def retina_head():
    shapes = {}
    for branch in ('cls_convs', 'reg_convs'):
        for k in range(4):
            shapes.update(conv(f'{branch}.{k}.conv', 256, 256, 3))
    return {**shapes, **conv('retina_cls', 9 * 80, 256, 3), **conv('retina_reg', 9 * 4, 256, 3)}


def mask_rcnn_heads():
    shapes = {**conv('rpn_head.rpn_conv', 256, 256, 3), **conv('rpn_head.rpn_cls', 3, 256, 1),
              **conv('rpn_head.rpn_reg', 3 * 4, 256, 1),
              **linear('roi_head.bbox_head.shared_fcs.0', 1024, 256 * 7 * 7),
              **linear('roi_head.bbox_head.shared_fcs.1', 1024, 1024),
              **linear('roi_head.bbox_head.fc_cls', 81, 1024),
              **linear('roi_head.bbox_head.fc_reg', 80 * 4, 1024)}
    for k in range(4):
        shapes.update(conv(f'roi_head.mask_head.convs.{k}.conv', 256, 256, 3))
    shapes.update({'roi_head.mask_head.upsample.weight': (256, 256, 2, 2),  # ConvTranspose2d
                   'roi_head.mask_head.upsample.bias': (256,)})
    return {**shapes, **conv('roi_head.mask_head.conv_logits', 80, 256, 1)}


def sem_fpn_head():
    """mmseg 0.x FPNHead: per level, log2(stride / 4) (at least 1) 3x3 ConvModules with
    SyncBN ('bn') each followed by a 2x upsampling (indices 0, 2, 4), then conv_seg."""
    shapes = {}
    for level, convs in enumerate((1, 1, 2, 3)):
        for k in range(convs):
            prefix = f'scale_heads.{level}.{2 * k}'
            shapes.update(conv(f'{prefix}.conv', 128, 256 if k == 0 else 128, 3, bias=False))
            shapes.update(batchnorm(f'{prefix}.bn', 128))
    return {**shapes, **conv('conv_seg', 150, 128, 1)}


def released_state_dict(family, arch, seed=0):
    """The state dict of a released checkpoint, in the names and shapes it was written with,
    holding seeded random values (BatchNorm variances positive, step counts integers)."""
    def under(prefix, shapes):
        return {f'{prefix}.{name}': shape for name, shape in shapes.items()}

    backbone_out = [AUTHORS_ARCHS[arch][3], *AUTHORS_ARCHS[arch][1]]
    shapes = under('backbone', authors_backbone(arch))
    if family == 'retinanet':
        shapes.update(under('neck', fpn(backbone_out, 1, True)))
        shapes.update(under('bbox_head', retina_head()))
    elif family == 'mask_rcnn':
        shapes.update(under('neck', fpn(backbone_out, 0, False)))
        shapes.update(mask_rcnn_heads())
    else:
        shapes.update(under('neck', fpn(backbone_out, 0, False)))
        shapes.update(under('decode_head', sem_fpn_head()))
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in shapes.items():
        if name.endswith('num_batches_tracked'):
            state[name] = torch.tensor(1000, dtype=torch.long)
        elif name.endswith('running_var'):
            state[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[name] = torch.rand(shape, generator=gen) * 0.2 - 0.1
    return state


def released_meta(family):
    """``meta`` as the releases' training wrote it: mmdet 2.x's / mmseg 0.x's tools/train.py
    (env_info, config as text, seed, exp_name), their checkpoint_config.meta (mmdet_version
    and CLASSES; mmseg_version, config, CLASSES and PALETTE), mmcv 1.x's runner (epoch, iter,
    hook_msgs.last_ckpt) and save_checkpoint (mmcv_version, time). All plain values."""
    meta = dict(env_info='sys.platform: linux\nPython: 3.8.10', seed=None,
                mmcv_version='1.3.13', time='Mon Sep 13 10:12:45 2021')
    if family == 'fpn':
        meta.update(exp_name='fpn_convmlp_s_512x512_40k_ade20k.py',
                    mmseg_version='0.17.0+3b4a9a6',
                    config="model = dict(type='EncoderDecoder', ...)",
                    CLASSES=('wall', 'building', 'sky'), PALETTE=[[120, 120, 120],
                                                                  [180, 120, 120], [6, 230, 230]],
                    iter=40000, epoch=161,
                    hook_msgs=dict(last_ckpt='work_dirs/fpn_convmlp_s/iter_36000.pth'))
    else:
        meta.update(exp_name=f'{family}_convmlp_s_fpn_1x_coco.py',
                    config="model = dict(type='RetinaNet', ...)",
                    mmdet_version='2.16.0d1b3b9d', CLASSES=COCO_CLASSES, epoch=12,
                    iter=87936, hook_msgs=dict(last_ckpt='work_dirs/convmlp/epoch_11.pth'))
    return meta


def write_released(path, state_dict, meta):
    """A checkpoint the way mmcv 1.x's save_checkpoint wrote it (torch.save of meta,
    state_dict and the AdamW state, with mmcv's initial_lr)."""
    optimizer = dict(state={0: dict(step=87936, exp_avg=torch.zeros(3),
                                    exp_avg_sq=torch.zeros(3))},
                     param_groups=[dict(lr=1e-6, betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=1e-4, amsgrad=False, initial_lr=1e-4,
                                        params=[0])])
    torch.save(dict(meta=meta, state_dict=OrderedDict(state_dict), optimizer=optimizer), path)


@pytest.mark.parametrize('family,arch', [('retinanet', 's'), ('mask_rcnn', 'm'), ('fpn', 'l')])
def test_released_layout_converts_and_loads_strictly(tmp_path, family, arch):
    """The names and shapes the releases wrote are today's: the conversion checks them
    against the config's model and keeps every tensor; the result loads strictly."""
    state = released_state_dict(family, arch)
    src, dst = tmp_path / 'released.pth', tmp_path / 'converted.pth'
    write_released(src, state, released_meta(family))

    report = convert_released_checkpoint(str(src), str(dst))
    assert (report.family, report.arch, report.config, report.checked) == \
        (family, arch, config(family, arch), True)
    assert report.unmapped == [] and report.dropped_classifier == []
    assert report.dropped_top_level == ['optimizer']
    assert report.unloaded_globals == []  # the published meta holds plain values only

    converted = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(converted) == {'state_dict', 'meta'}
    assert list(converted['state_dict']) == list(state)
    for name, tensor in state.items():
        assert torch.equal(converted['state_dict'][name], tensor), name
    meta = converted['meta']
    if family == 'fpn':
        assert meta['dataset_meta'] == dict(classes=('wall', 'building', 'sky'),
                                            palette=released_meta('fpn')['PALETTE'])
        assert meta['mmseg_version'] == '0.17.0+3b4a9a6' and meta['iter'] == 40000
    else:
        assert meta['dataset_meta'] == dict(classes=COCO_CLASSES)
        assert meta['mmdet_version'] == '2.16.0d1b3b9d' and meta['epoch'] == 12

    # what tools/test.py does, strictly here: load it into the config's model
    model = build_config_model(config(family, arch))
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


class OldConfig:
    """Stands for an mmcv 1.x ``Config`` object, which some checkpoints pickle in ``meta``."""

    def __init__(self, text):
        self._text = text


class RunsACommand:
    """A pickle that, loaded with plain ``pickle``, would run a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def unsafe_meta(extra=None):
    """A meta beyond the published one: objects ``weights_only`` loading refuses (a config
    object, numpy scalars and arrays, as other OpenMMLab 1.x-era files hold)."""
    meta = released_meta('mask_rcnn')
    meta.update(config=OldConfig("model = dict(type='MaskRCNN')"), seed=np.int64(0),
                hook_msgs=dict(last_ckpt='work_dirs/epoch_12.pth', best_score=np.float64(0.384)),
                img_norm_mean=np.array([123.675, 116.28, 103.53], dtype=np.float32))
    meta.update(extra or {})
    return meta


def test_unsafe_meta_is_kept_as_text_or_numbers(tmp_path):
    state = released_state_dict('mask_rcnn', 's')
    src, dst = tmp_path / 'released.pth', tmp_path / 'converted.pth'
    write_released(src, state, unsafe_meta())
    with pytest.raises(pickle.UnpicklingError):  # why such files need converting
        torch.load(src, map_location='cpu', weights_only=True)

    report = convert_released_checkpoint(str(src), str(dst))
    assert report.checked and 'numpy.dtype' in report.unloaded_globals
    assert f'{__name__}.OldConfig' in report.unloaded_globals
    meta = torch.load(dst, map_location='cpu', weights_only=True)['meta']
    assert meta['config'] == f'<not loaded: {__name__}.OldConfig>'
    # numeric numpy values are read back from their bytes, without numpy unpickling them
    assert meta['seed'] == 0 and meta['hook_msgs']['best_score'] == 0.384
    assert meta['img_norm_mean'] == pytest.approx([123.675, 116.28, 103.53])


def test_a_malicious_global_is_never_called(tmp_path, monkeypatch):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    write_released(path, {'neck.conv.weight': torch.ones(2)},
                   unsafe_meta(dict(payload=RunsACommand(f'touch {marker}'),
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
    write_released(path, state, released_meta('mask_rcnn'))
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
    state = released_state_dict('fpn', 's')
    assert infer_model(state) == ('fpn', 's')
    del state['decode_head.conv_seg.weight']
    path = tmp_path / 'released.pth'
    write_released(path, state, released_meta('fpn'))
    with pytest.raises(CheckpointMismatchError, match='decode_head.conv_seg.weight'):
        convert_released_checkpoint(str(path), str(tmp_path / 'out.pth'))
    wrong_arch = config('fpn', 'm')
    with pytest.raises(CheckpointMismatchError, match='shape mismatch') as error:
        convert_released_checkpoint(str(path), str(tmp_path / 'out.pth'), config=wrong_arch)
    assert 'backbone.stages.0.blocks.0.channel_mlp1.fc1.weight' in str(error.value)
    assert not (tmp_path / 'out.pth').exists()


def printed_metrics(log):
    """The segmentation metrics a test run printed (``Iter(test) [1/1]  aAcc: 61.2300 ...``)."""
    (line,) = [line for line in log.splitlines() if 'Iter(test)' in line and 'mIoU' in line]
    return {name: float(value) for name, value in re.findall(r'(\w+): ([\d.]+)', line)
            if name in ('aAcc', 'mIoU', 'mAcc')}


def evaluate_in_process(config_path, checkpoint, work_dir):
    """The test metrics of ``checkpoint``, loaded strictly into the config's model, from
    mmengine's Runner in this process, on one thread as the tool run."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(config_path)
    cfg.work_dir, cfg.load_from = str(work_dir), None
    runner = Runner.from_cfg(cfg)
    load_checkpoint(runner.model, str(checkpoint), map_location='cpu', strict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return runner.test()
    finally:
        torch.set_num_threads(threads)


def test_one_command_then_tools_test(tmp_path, capsys, monkeypatch):
    """The documented route for a downloaded file whose meta safe loading refuses:
    tools/test.py on it as downloaded says to convert it; the converter, then tools/test.py,
    which reports the metrics an evaluation of the same weights in this process gives."""
    from mmconvmlp.datasets import write_shapes_dataset
    write_shapes_dataset(str(tmp_path / 'data'), num_train=1, num_val=1, image_size=64,
                         seed=0)
    state = released_state_dict('fpn', 's')
    state['decode_head.conv_seg.bias'][5:] = -20.  # predict the 5 classes of the data set
    src, dst = tmp_path / 'sem_fpn_convmlp_s_ade20k.pth', tmp_path / 'converted.pth'
    write_released(src, state, unsafe_meta())
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    refused = subprocess.run([sys.executable, osp.join(ROOT, 'tools/test.py'),
                              config('fpn'), str(src), '--work-dir', str(tmp_path / 'work')],
                             **run)
    assert refused.returncode != 0
    assert 'convert_released_checkpoint.py' in refused.stderr, refused.stderr[-4000:]
    assert 'Traceback' not in refused.stderr

    converter = runpy.run_path(CONVERTER, run_name='converter')
    assert converter['main']([str(src), str(dst)]) == 0
    assert 'fpn_convmlp_s_ade20k.py' in capsys.readouterr().out

    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools/test.py'),
                             config('fpn'), str(dst), '--work-dir', str(tmp_path / 'work')],
                            **run)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert 'do not match exactly' not in log and 'missing keys' not in log
    reported = printed_metrics(log)

    monkeypatch.chdir(tmp_path)
    expected = evaluate_in_process(config('fpn'), dst, tmp_path / 'in_process')
    assert set(reported) == {'mIoU', 'aAcc', 'mAcc'} <= set(expected)
    assert reported == pytest.approx({k: expected[k] for k in reported}, abs=0.011)
    assert 0 < expected['mIoU'] < 100  # a value that tells weights apart


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
    numpy numbers (mmseg 0.x's best mIoU is a numpy float) loads as downloaded, the way
    tools/test.py loads it (weights_only, with the numpy globals importing mmconvmlp
    allows); strictly."""
    state = released_state_dict('fpn', 's')
    path = tmp_path / 'sem_fpn_convmlp_s_ade20k.pth'
    meta = released_meta('fpn')
    meta['hook_msgs'].update(best_score=np.float64(0.358), best_ckpt='iter_40000.pth')
    write_released(path, state, meta)
    model = build_config_model(config('fpn'))
    load_checkpoint(model, str(path), map_location='cpu', strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
