# Semantic FPN with a ConvMLP-S backbone on ADE20K, the authors' setup (Li et al. 2021).
# Paper: 12.8M parameters, 35.8 mIoU (single scale) on ADE20K val.
# Assumes 32 images per iteration (8 GPUs x 4 images); with another total batch size,
# pass --auto-scale-lr to scale the learning rate from auto_scale_lr.base_batch_size.
# 40k iterations of AdamW with poly decay, evaluated every 4k. Starts from the authors'
# ImageNet-1k checkpoint. The data pipeline (2048x512 resize with ratio 0.5-2.0, 512x512
# crops with cat_max_ratio 0.75, flip, photometric distortion), FPN (256 channels, 4
# outputs) and FPN head (128 channels, SyncBN, 150 classes) are the stock mmseg config.
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmconvmlp'], allow_failed_imports=False)
# mmengine's Runner plus mmconvmlp's runtime fixes (gloo processes without CUDA, the data
# check); mmdet's and mmseg's own tools/train.py and tools/test.py build it too.
runner_type = 'ConvMLPRunner'

checkpoint = 'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_s_imagenet.pth'
model = dict(
    # The base model names an ImageNet ResNet to download; the backbone's init_cfg
    # loads the ConvMLP checkpoint instead.
    pretrained=None,
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
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4))

max_iters = 40000
interval = 4000
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters,
         by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=interval)
default_hooks = dict(checkpoint=dict(interval=interval))

auto_scale_lr = dict(enable=False, base_batch_size=32)
