# Semantic FPN with a ConvMLP-M backbone on ADE20K, the authors' setup.
# Paper: 21.1M parameters, 38.6 mIoU. 32 images per iteration (8 GPUs x 4), as in the
# ConvMLP-S config this inherits; only the backbone size and its checkpoint differ.
_base_ = './fpn_convmlp_s_ade20k.py'

checkpoint = 'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_m_imagenet.pth'
# ConvMLP-M has the widths of ConvMLP-S, so FPN's in_channels stay as they are.
model = dict(backbone=dict(arch='m', init_cfg=dict(checkpoint=checkpoint)))
