"""What the README promises of the tools' options, each run once, small: registration in a
third OpenMMLab scope, ``tools/train.py --amp --auto-scale-lr`` and ``--resume CHECKPOINT``,
``tools/test.py --tta --out DIR --show-dir DIR`` for segmentation and ``--show-dir`` for
detection, SyncBN in CPU processes, and ``get_flops`` for ConvMLP-M and L.

The tools run on Semantic FPN + ConvMLP-S (the quickest paper config; RetinaNet for
detection) over shapes data sets of 1-2 + 1-2 images of 64x64, written by the tests, with the
configs' image sizes shrunk, one data-loading process, no ImageNet weights
(``model.backbone.init_cfg=None``) and CUDA hidden (``CUDA_VISIBLE_DEVICES=''``), so that the
CPU paths run on any machine.
"""
import glob
import os
import os.path as osp
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from mmconvmlp.datasets import write_shapes_dataset
from mmconvmlp.models import ConvMLP

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEM_FPN = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_ade20k.py')
RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_coco.py')
TIMEOUT = 300


def small_options(config, scale):
    """``--cfg-options`` for a quick run on 64x64 images: no ImageNet weights, one
    data-loading process, resizes into ``scale`` (W, H) instead of 2048x512 or 1333x800,
    64x64 crops, batches of one; logs and checkpoints after every iteration."""
    cfg = Config.fromfile(config)
    options = ['model.backbone.init_cfg=None', 'train_dataloader.batch_size=1',
               'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=1']
    if cfg.default_scope == 'mmseg':
        options.append('model.data_preprocessor.size=(64,64)')
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [f'{loader}.num_workers=0', f'{loader}.persistent_workers=False']
        for i, step in enumerate(cfg[loader].dataset.pipeline):
            if step.type in ('Resize', 'RandomResize'):
                options.append(f'{loader}.dataset.pipeline.{i}.scale={scale}')
            elif step.type == 'RandomCrop':
                options.append(f'{loader}.dataset.pipeline.{i}.crop_size=(64,64)')
    return options


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """(folder holding data/ade/..., environment for the tools)."""
    root = tmp_path_factory.mktemp('tool_options')
    write_shapes_dataset(str(root / 'data'), num_train=2, num_val=1, image_size=64, seed=0)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1',
               PYTHONWARNINGS='ignore')
    return root, env


def run_tool(name, args, root, env):
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', name), *map(str, args)],
                            cwd=root, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


def test_registered_in_a_third_scope():
    """ConvMLP lives in mmengine's root registry, which every scope's registry falls back
    to: mmpretrain's where it is installed, else a scope made here the same way (a child
    of the root model registry, as every OpenMMLab 2.x codebase makes its own)."""
    from mmengine.registry import MODELS, DefaultScope, Registry
    try:
        from mmpretrain.registry import MODELS as scope_models
        scope = 'mmpretrain'
    except ImportError:
        scope = 'third_codebase'
        scope_models = MODELS.children[scope] if scope in MODELS.children else \
            Registry('model', parent=MODELS, scope=scope)
    with DefaultScope.overwrite_default_scope(scope):
        backbone = scope_models.build(dict(type='ConvMLP', arch='s', out_indices=(3,)))
    assert type(backbone) is ConvMLP and list(backbone.out_channels) == [512]


def test_train_amp_auto_scale_lr_then_resume_then_test_tta_out_show_dir(workspace):
    """train.py --amp --auto-scale-lr for one iteration; train.py --resume CHECKPOINT for a
    second; test.py --tta --out DIR --show-dir DIR on the result."""
    root, env = workspace
    options = small_options(SEM_FPN, '(128,64)')
    first = root / 'first'
    log = run_tool('train.py', [SEM_FPN, '--work-dir', first, '--amp', '--auto-scale-lr',
                                '--cfg-options', 'train_cfg.max_iters=1', *options],
                   root, env)
    # --amp without CUDA: MixedPrecisionOptimWrapper, which says what it chose and why
    assert "type='MixedPrecisionOptimWrapper'" in log
    assert 'Mixed precision on cpu: ' in log
    # --auto-scale-lr: 1 image per iteration instead of 32, so 1/32 of the config's LR
    checkpoint = torch.load(first / 'iter_1.pth', map_location='cpu')
    (group,) = checkpoint['optimizer']['param_groups']
    assert group['initial_lr'] == pytest.approx(2e-4 / 32)

    second = root / 'second'
    log = run_tool('train.py', [SEM_FPN, '--work-dir', second, '--resume',
                                first / 'iter_1.pth', '--amp', '--auto-scale-lr',
                                '--cfg-options', 'train_cfg.max_iters=2', *options],
                   root, env)
    assert f'Load checkpoint from {first / "iter_1.pth"}' in log
    assert 'resumed epoch: 0, iter: 1' in log
    # it trained iteration 2 only
    assert (second / 'iter_2.pth').is_file() and not (second / 'iter_1.pth').exists()
    resumed = torch.load(second / 'iter_2.pth', map_location='cpu')
    assert resumed['meta']['iter'] == 2

    maps, pictures, work = root / 'maps', root / 'pictures', root / 'test'
    # --show-dir draws every image (mmseg's visualization hook alone draws every 50th)
    log = run_tool('test.py', [SEM_FPN, second / 'iter_2.pth', '--work-dir', work, '--tta',
                               '--out', maps, '--show-dir', pictures, '--cfg-options',
                               *options],
                   root, env)
    assert "type='SegTTAModel'" in log  # the config the runner ran
    assert 'mIoU' in log
    # --out DIR: one PNG label map per validation image, at the image's size
    (png,) = glob.glob(str(maps / '*.png'))
    assert osp.basename(png) == 'ADE_val_00000001.png'
    labels = np.asarray(Image.open(png))
    assert labels.shape == (64, 64) and labels.dtype == np.uint8
    # --show-dir DIR: the image with the prediction drawn on it
    drawn = glob.glob(str(pictures / '**' / '*.png'), recursive=True)
    assert len(drawn) == 1 and Image.open(drawn[0]).size[1] >= 64


def test_test_show_dir_for_detection(tmp_path):
    """test.py --show-dir with a detector: mmdet's hook draws every test image, into the
    folder named inside the run's timestamped folder of the work dir."""
    from mmconvmlp.config_models import build_config_model
    write_shapes_dataset(str(tmp_path / 'data'), num_train=1, num_val=2, image_size=64,
                         seed=0, class_names=('person', 'bicycle', 'car'))
    state = build_config_model(RETINANET).state_dict()
    # detections of the data set's three classes (COCO's first), at scores near 0.5
    bias = torch.full_like(state['bbox_head.retina_cls.bias'], -20.).view(-1, 80)
    bias[:, :3] = 0
    state['bbox_head.retina_cls.bias'] = bias.flatten()
    torch.save(dict(state_dict=state), tmp_path / 'retinanet.pth')
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1',
               PYTHONWARNINGS='ignore')
    log = run_tool('test.py', [RETINANET, tmp_path / 'retinanet.pth', '--work-dir',
                               tmp_path / 'work', '--show-dir', 'pictures', '--cfg-options',
                               *small_options(RETINANET, '(128,128)')], tmp_path, env)
    assert 'coco/bbox_mAP' in log
    drawn = sorted(osp.basename(p) for p in glob.glob(str(tmp_path / 'work' / '*' /
                                                           'pictures' / '*.jpg')))
    assert drawn == ['000000000001.jpg', '000000000002.jpg']


def test_syncbn_becomes_batchnorm_with_a_warning_in_cpu_processes(tmp_path):
    """CPUDistributedDataParallel (what CPU processes are wrapped in) replaces SyncBN, which
    runs on GPUs only, by BatchNorm with per-process statistics, and says so; one gloo
    process here."""
    import torch.distributed as dist

    from mmconvmlp.engine.cpu_processes import CPUDistributedDataParallel
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4))
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    try:
        with pytest.warns(UserWarning, match='SyncBN runs on GPUs only'):
            wrapped = CPUDistributedDataParallel(model)
        norms = [m for m in wrapped.modules() if isinstance(m, torch.nn.modules.batchnorm
                                                            ._BatchNorm)]
        assert len(norms) == 1 and not isinstance(norms[0], torch.nn.SyncBatchNorm)
        out = wrapped(torch.randn(2, 3, 8, 8))
        out.sum().backward()
        assert out.shape == (2, 4, 6, 6)
        assert norms[0].num_batches_tracked == 1  # it normalised with batch statistics
    finally:
        dist.destroy_process_group()
    with warnings.catch_warnings():  # no SyncBN: nothing to say
        warnings.simplefilter('error')
        dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store2"}', rank=0,
                                world_size=1)
        try:
            CPUDistributedDataParallel(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize('arch,paper_gmacs,readme_gmacs', [('m', 3.9, 3.95), ('l', 9.9, 9.90)])
def test_get_flops_for_convmlp_m_and_l(arch, paper_gmacs, readme_gmacs):
    """The ImageNet classifiers at 224x224: the paper's GMACs to its precision, the
    README's to two decimals."""
    get_flops = runpy.run_path(osp.join(ROOT, 'tools/analysis/get_flops.py'))
    macs, _ = get_flops['count'](get_flops['imagenet_model'](arch), 224, 224)
    assert round(macs, 1) == paper_gmacs and round(macs, 2) == readme_gmacs


def test_get_flops_for_a_config():
    """Semantic FPN + ConvMLP-L through the config path (built in the mmseg scope, the
    segmentor's tensor forward): the README's 73.5 GMACs at 512x512 and 46.33M parameters.
    Counted at 256x256, a quarter of the work: every map is then exactly a quarter."""
    get_flops = runpy.run_path(osp.join(ROOT, 'tools/analysis/get_flops.py'))
    model, scope = get_flops['config_model'](
        osp.join(ROOT, 'configs/segmentation/fpn_convmlp_l_ade20k.py'))
    macs, params = get_flops['count'](model, 256, 256, scope)
    assert scope == 'mmseg' and round(4 * macs, 1) == 73.5 and round(params, 2) == 46.33
