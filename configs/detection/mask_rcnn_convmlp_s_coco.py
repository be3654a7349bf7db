# Mask R-CNN with a ConvMLP-S backbone on COCO 2017, the authors' setup (Li et al. 2021).
# Paper: 28.7M parameters, box AP 38.4 and mask AP 35.7 on COCO val2017.
# Assumes 16 images per iteration (8 GPUs x 2 images); with another total batch size,
# pass --auto-scale-lr to scale the learning rate from auto_scale_lr.base_batch_size.
# Starts from the authors' ImageNet-1k checkpoint. Everything else (data pipeline with
# 1333x800 resize and flip 0.5, FPN with 5 outputs, RPN and RoI heads, 1x schedule with
# 500-iteration linear warm-up and steps after epochs 8 and 11) is the stock mmdet config.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmconvmlp'], allow_failed_imports=False)
# mmengine's Runner plus mmconvmlp's runtime fixes (gloo processes without CUDA, the data
# check); mmdet's and mmseg's own tools/train.py and tools/test.py build it too.
runner_type = 'ConvMLPRunner'

checkpoint = 'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_s_imagenet.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ConvMLP',
        arch='s',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 256, 512]))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4))

auto_scale_lr = dict(enable=False, base_batch_size=16)
