# RetinaNet with a ConvMLP-M backbone on COCO 2017, the authors' setup.
# Paper: 27.1M parameters, box AP 39.4. 16 images per iteration (8 GPUs x 2), as in the
# ConvMLP-S config this inherits; only the backbone size and its checkpoint differ.
_base_ = './retinanet_convmlp_s_coco.py'

checkpoint = 'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_m_imagenet.pth'
# ConvMLP-M has the widths of ConvMLP-S, so FPN's in_channels stay as they are.
model = dict(backbone=dict(arch='m', init_cfg=dict(checkpoint=checkpoint)))
