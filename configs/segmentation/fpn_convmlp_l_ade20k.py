# Semantic FPN with a ConvMLP-L backbone on ADE20K, the authors' setup.
# Paper: 46.3M parameters, 40.0 mIoU. 32 images per iteration (8 GPUs x 4), as in the
# ConvMLP-S config this inherits; only the backbone size and its checkpoint differ.
_base_ = './fpn_convmlp_s_ade20k.py'

checkpoint = 'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_l_imagenet.pth'
model = dict(
    backbone=dict(arch='l', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))
