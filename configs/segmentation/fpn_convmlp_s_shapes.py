# Semantic FPN + ConvMLP-S on the shapes demo data (python tools/make_shapes_dataset.py, its
# ADE20K layout), trained from scratch on a CPU in minutes: `python tools/train.py THIS_CONFIG`.
# Against the paper's ADE20K config this changes the data (background + 4 shape categories,
# 96x96 images), the input size and the schedule only. The model is the same but for the
# number of classes, BN instead of SyncBN in the head (one process) and the ImageNet
# initialisation (nothing is downloaded: the backbone starts from scratch). Training runs in
# bfloat16 where the CPU has bfloat16 units and in float32 where it would only emulate them
# (MixedPrecisionOptimWrapper, mmconvmlp/engine/precision.py); validation runs in float32.
_base_ = './fpn_convmlp_s_ade20k.py'

custom_imports = dict(imports=['mmconvmlp', 'mmconvmlp.engine'], allow_failed_imports=False)

data_root = 'data/shapes/ade/ADEChallengeData2016'
# Labels in the maps: 0 "other" (the distracting strokes; ignored through reduce_zero_label),
# 1 background, 2.. the shapes.
classes = ('background', 'circle', 'triangle', 'square', 'star')
metainfo = dict(classes=classes,
                palette=[(90, 90, 90), (230, 25, 75), (60, 180, 75), (0, 130, 200),
                         (255, 225, 25)])
image_size = (96, 96)

model = dict(
    data_preprocessor=dict(size=image_size),
    backbone=dict(init_cfg=None),
    decode_head=dict(num_classes=len(classes), norm_cfg=dict(type='BN', requires_grad=True)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# ADE20KDataset carries ADE20K's 150 class names; the generic dataset takes ours.
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True)
train_dataloader = dict(
    batch_size=8, num_workers=1,
    dataset=dict(_delete_=True, **dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training',
                                  seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=10, num_workers=1,
    dataset=dict(_delete_=True, **dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation',
                                  seg_map_path='annotations/validation')))
test_dataloader = val_dataloader

max_iters = 2000
interval = 250
train_cfg = dict(max_iters=max_iters, val_interval=interval)
# The paper's AdamW (weight decay 1e-4) with the detection demo's learning rate and gradient
# clipping; `fused` only changes how the update is computed (one kernel for all parameters).
optim_wrapper = dict(_delete_=True, type='MixedPrecisionOptimWrapper',
                     optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4, fused=True),
                     clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='PolyLR', power=0.9, eta_min=0.0, by_epoch=False, begin=100, end=max_iters),
]
# A checkpoint at every validation (the last two kept), so that a stopped or preempted run
# loses at most 250 iterations: `--resume` continues from the latest.
default_hooks = dict(logger=dict(interval=25),
                     checkpoint=dict(interval=interval, max_keep_ckpts=2))
# A fixed seed makes the run repeatable (for the same number of threads).
randomness = dict(seed=0)
