"""Example: a ConvMLP built by timm inside MMSegmentation's ``TIMMBackbone``.

    python tools/examples/timm_convmlp_in_mmseg.py

Builds Semantic FPN (the stock MMSegmentation 1.x ADE20K model) whose backbone is
``mmseg.TIMMBackbone`` wrapping ``timm.create_model('convmlp_s', features_only=True)``, runs
one random 64x64 image through it and prints the four backbone maps and the logits. The
same ``model`` section works in a training config; for the released ImageNet weights set
``pretrained=True`` (downloads) or ``checkpoint_path='convmlp_s_imagenet.pth'`` (a local copy).
"""
import os.path as osp
import sys

import torch
from mmengine.config import Config

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

CONFIG = """
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmconvmlp'], allow_failed_imports=False)  # registers convmlp_*
model = dict(
    pretrained=None,  # the base config would otherwise hand the backbone a ResNet URL
    backbone=dict(
        _delete_=True,
        type='mmseg.TIMMBackbone',
        model_name='convmlp_s',
        features_only=True,
        pretrained=False,
        out_indices=(0, 1, 2, 3)),  # strides 4, 8, 16, 32; channels 64, 128, 256, 512
    neck=dict(in_channels=[64, 128, 256, 512]))
"""


def main():
    from mmconvmlp.config_models import build_config_model
    model = build_config_model(Config.fromstring(CONFIG, file_format='.py'))
    model.init_weights()
    model.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model.backbone(image)
        logits = model(image, mode='tensor')
    for index, feature_map in enumerate(maps):
        print(f'map {index}: {tuple(feature_map.shape)}')
    print(f'segmentation logits: {tuple(logits.shape)}')


if __name__ == '__main__':
    main()
