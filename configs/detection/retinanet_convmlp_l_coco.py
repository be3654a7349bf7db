# RetinaNet with a ConvMLP-L backbone on COCO 2017, the authors' setup.
# Paper: 52.9M parameters, box AP 40.2. 16 images per iteration (8 GPUs x 2), as in the
# ConvMLP-S config this inherits; only the backbone size and its checkpoint differ.
_base_ = './retinanet_convmlp_s_coco.py'

checkpoint = 'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_l_imagenet.pth'
model = dict(
    backbone=dict(arch='l', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))
