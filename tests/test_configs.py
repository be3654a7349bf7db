"""The nine paper configs: the models they build and the training setups they hold."""
import os.path as osp

import pytest
from mmengine.config import Config

from mmconvmlp.config_models import build_config_model

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
URL = 'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_{}_imagenet.pth'

#: config -> the paper's parameter count in millions, and the exact count these configs build.
#: All nine agree with the paper to 0.05M except Mask R-CNN + ConvMLP-M: 37,047,504 is 37.0M,
#: which the paper gives as 37.1M (37.05 rounded up again); hence the tolerance of 0.055M.
PAPER_PARAMS = {
    'detection/retinanet_convmlp_s_coco.py': 18.7,
    'detection/retinanet_convmlp_m_coco.py': 27.1,
    'detection/retinanet_convmlp_l_coco.py': 52.9,
    'detection/mask_rcnn_convmlp_s_coco.py': 28.7,
    'detection/mask_rcnn_convmlp_m_coco.py': 37.1,
    'detection/mask_rcnn_convmlp_l_coco.py': 62.2,
    'segmentation/fpn_convmlp_s_ade20k.py': 12.8,
    'segmentation/fpn_convmlp_m_ade20k.py': 21.1,
    'segmentation/fpn_convmlp_l_ade20k.py': 46.3,
}
EXACT_PARAMS = {
    'detection/retinanet_convmlp_s_coco.py': 18742484,
    'detection/retinanet_convmlp_m_coco.py': 27130068,
    'detection/retinanet_convmlp_l_coco.py': 52896004,
    'detection/mask_rcnn_convmlp_s_coco.py': 28659920,
    'detection/mask_rcnn_convmlp_m_coco.py': 37047504,
    'detection/mask_rcnn_convmlp_l_coco.py': 62231808,
    'segmentation/fpn_convmlp_s_ade20k.py': 12759158,
    'segmentation/fpn_convmlp_m_ade20k.py': 21146742,
    'segmentation/fpn_convmlp_l_ade20k.py': 46331046,
}
TAP_CHANNELS = {'s': [64, 128, 256, 512], 'm': [64, 128, 256, 512],
                'l': [96, 192, 384, 768]}


def load(name):
    return Config.fromfile(osp.join(ROOT, 'configs', name))


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_builds_with_paper_parameter_count(name):
    cfg = load(name)
    model = build_config_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert params / 1e6 == pytest.approx(PAPER_PARAMS[name], abs=0.055), params
    assert params == EXACT_PARAMS[name]
    arch = name.split('_convmlp_')[1][0]
    backbone = cfg.model.backbone
    assert backbone.type == 'ConvMLP' and backbone.arch == arch
    # all four maps leave the backbone; FPN takes them all (RetinaNet uses 1..3)
    assert list(model.backbone.out_channels) == TAP_CHANNELS[arch]
    assert list(cfg.model.neck.in_channels) == TAP_CHANNELS[arch]
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=URL.format(arch))
    assert cfg.custom_imports == dict(imports=['mmconvmlp'], allow_failed_imports=False)


@pytest.mark.parametrize('family', ['retinanet', 'mask_rcnn'])
def test_detection_setup(family):
    cfg = load(f'detection/{family}_convmlp_s_coco.py')
    assert cfg.default_scope == 'mmdet'
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, weight_decay=1e-4)
    assert cfg.optim_wrapper.get('clip_grad') is None
    assert cfg.train_cfg.max_epochs == 12
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end, warmup.by_epoch) == \
        ('LinearLR', 0.001, 500, False)
    assert (steps.type, steps.milestones) == ('MultiStepLR', [8, 11])
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    assert cfg.train_dataloader.batch_size == 2
    resize = [t for t in cfg.train_pipeline if t.type == 'Resize'][0]
    assert resize.scale == (1333, 800) and resize.keep_ratio
    assert cfg.model.neck.num_outs == 5 and cfg.model.neck.out_channels == 256
    assert cfg.model.neck.get('start_level', 0) == (1 if family == 'retinanet' else 0)


def test_segmentation_setup():
    cfg = load('segmentation/fpn_convmlp_s_ade20k.py')
    assert cfg.default_scope == 'mmseg'
    assert cfg.model.pretrained is None
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=2e-4, weight_decay=1e-4)
    assert cfg.train_cfg.max_iters == 40000 and cfg.train_cfg.val_interval == 4000
    assert cfg.default_hooks.checkpoint.interval == 4000
    (poly,) = cfg.param_scheduler
    assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9, 0.0, 40000)
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=32)
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    assert cfg.model.decode_head.num_classes == 150
    assert cfg.model.decode_head.channels == 128
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    assert cfg.val_evaluator.iou_metrics == ['mIoU']


@pytest.mark.parametrize('family,base', [
    ('detection/retinanet_convmlp_{}_coco.py', 'retinanet_convmlp_s_coco.py'),
    ('detection/mask_rcnn_convmlp_{}_coco.py', 'mask_rcnn_convmlp_s_coco.py'),
    ('segmentation/fpn_convmlp_{}_ade20k.py', 'fpn_convmlp_s_ade20k.py'),
])
def test_m_and_l_change_only_the_backbone_size(family, base):
    small = load(family.format('s'))
    for arch in 'ml':
        text = open(osp.join(ROOT, 'configs', family.format(arch))).read()
        assert f"_base_ = './{base}'" in text
        cfg = load(family.format(arch))
        for key in ('optim_wrapper', 'param_scheduler', 'train_cfg', 'auto_scale_lr',
                    'train_dataloader', 'test_dataloader'):
            assert cfg[key] == small[key], key
        assert cfg.model.backbone.arch == arch


def test_a_config_without_a_scope_is_refused(tmp_path):
    path = tmp_path / 'no_scope.py'
    path.write_text("model = dict(type='ConvMLP')\n")
    with pytest.raises(ValueError, match='no_scope.py sets no default_scope'):
        build_config_model(str(path))
