# Mask R-CNN + ConvMLP-S on the shapes demo data (python tools/make_shapes_dataset.py), trained
# from scratch on a CPU in minutes: `python tools/train.py THIS_CONFIG`.
# Against the paper's COCO config this changes the data (4 shape categories, 96x96 images),
# the input size and the schedule only, and samples fewer proposals and RoIs per image in
# training (a handful of shapes per small image needs no 2000 proposals and 512 RoIs). The
# model is the same but for the number of classes and the ImageNet initialisation (nothing
# is downloaded: the backbone starts from scratch). Training runs in float32.
_base_ = './mask_rcnn_convmlp_s_coco.py'

data_root = 'data/shapes/coco/'
classes = ('circle', 'triangle', 'square', 'star')
metainfo = dict(classes=classes,
                palette=[(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25)])
image_size = (96, 96)

model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes=len(classes)),
                  mask_head=dict(num_classes=len(classes))),
    train_cfg=dict(rpn_proposal=dict(nms_pre=300, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4, num_workers=1,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=10, num_workers=1,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

max_epochs = 3
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
# float32 on every CPU: mmcv's CPU RoIAlign and NMS have no bfloat16 kernels, so this demo
# does not use MixedPrecisionOptimWrapper.
# The RetinaNet demo's learning rate; `fused` only changes how AdamW's update is computed.
optim_wrapper = dict(optimizer=dict(lr=1e-3, fused=True),
                     clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs,
         eta_min_ratio=0.05, convert_to_iter_based=True),
]
# A checkpoint every epoch (the last two kept), so that a stopped or preempted run loses at
# most an epoch: `--resume` continues from the latest.
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(interval=1, max_keep_ckpts=2))
# A fixed seed makes the run repeatable (for the same number of threads).
randomness = dict(seed=0)
