# RetinaNet + ConvMLP-S on the shapes demo data (python tools/make_shapes_dataset.py), trained
# from scratch on a CPU in minutes: `python tools/train.py THIS_CONFIG`, or `bash tools/demo.sh`.
# Against the paper's COCO config this changes the data (4 shape categories, 96x96 images),
# the input size, the schedule, and the width of FPN and the head: 128 channels and 2 stacked
# convolutions per branch instead of 256 and 4. At 96x96 the paper's head costs more than the
# backbone; the lighter one halves a training step and learns these shapes faster per epoch.
# The backbone is the paper's ConvMLP-S but for the ImageNet initialisation (nothing is
# downloaded: it starts from scratch). Training runs in bfloat16 where the CPU has bfloat16
# units and in float32 where it would only emulate them (MixedPrecisionOptimWrapper, see
# mmconvmlp/engine/precision.py); validation runs in float32.
_base_ = './retinanet_convmlp_s_coco.py'

custom_imports = dict(imports=['mmconvmlp', 'mmconvmlp.engine'], allow_failed_imports=False)

data_root = 'data/shapes/coco/'
classes = ('circle', 'triangle', 'square', 'star')
metainfo = dict(classes=classes,
                palette=[(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25)])
image_size = (96, 96)

model = dict(
    backbone=dict(init_cfg=None),
    neck=dict(out_channels=128),
    bbox_head=dict(num_classes=len(classes), in_channels=128, feat_channels=128,
                   stacked_convs=2))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# Two CPU cores: one loader process is plenty for 96x96 JPEGs. Eight images a step use the
# cores better than four (the per-step cost of the convolutions' weight layouts is shared).
train_dataloader = dict(
    batch_size=8, num_workers=1,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=10, num_workers=1,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# From scratch: a 10x larger learning rate than the paper's fine-tuning one (twice this
# diverged with the paper's head), a short warm-up, cosine decay; validation after every epoch
# for the training curves. `fused` only changes how AdamW's update is computed (one kernel for all parameters).
max_epochs = 10
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
optim_wrapper = dict(type='MixedPrecisionOptimWrapper', optimizer=dict(lr=1e-3, fused=True),
                     clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs,
         eta_min_ratio=0.05, convert_to_iter_based=True),
]
# A checkpoint every epoch (the last two kept), so that a stopped or preempted run loses at
# most an epoch: `--resume` continues from the latest.
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(interval=1, max_keep_ckpts=2))
# A fixed seed makes the run repeatable (for the same number of threads); unseeded runs
# spread by a few points of mAP (see the README).
randomness = dict(seed=0)
