"""Count the multiply-accumulates (MACs) and parameters of the ConvMLP models, next to the
paper's numbers.

    python tools/analysis/get_flops.py                      # the paper's 12 models
    python tools/analysis/get_flops.py --models imagenet    # only the ImageNet classifiers
    python tools/analysis/get_flops.py --config CONFIG --shape 1280 800   # any config
    python tools/analysis/get_flops.py --config mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py

Counting: mmengine's FlopAnalyzer (fvcore's rules: one multiply-accumulate of a
convolution, linear layer or matrix product counts 1, a normalization layer or an
upsampling counts its elements, element-wise operations such as activations and
additions, and max-pooling, count nothing), on a traced forward pass of one image.
ImageNet classifiers: the backbone plus its classifier (LayerNorm, mean over positions,
Linear to 1000 classes) at 224x224. Detectors: ``mode='tensor'`` forward (backbone, neck,
heads; Mask R-CNN with the RoI heads on the RPN's proposals, which mmcv's RoIAlign
contributes nothing to) at 1280x800 (width x height), the customary size for COCO
detectors. Segmentors: the whole-image forward at 2048x512 (the ADE20K test resize of a
4:1 image), and 512x512 (one training crop). Nothing is downloaded: the models are built
without their pretrained weights.
"""
import argparse
import logging
import os.path as osp
import sys
import warnings

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

#: (name, config or None for the ImageNet classifier, arch, paper params M, paper GMACs)
MODELS = [
    ('ConvMLP-S ImageNet', None, 's', 9.0, 2.4),
    ('ConvMLP-M ImageNet', None, 'm', 17.4, 3.9),
    ('ConvMLP-L ImageNet', None, 'l', 42.7, 9.9),
] + [
    (f'{title} + ConvMLP-{arch.upper()}', f'configs/{family}_convmlp_{arch}_{suffix}.py',
     arch, params, None)
    for title, family, suffix, param_list in [
        ('RetinaNet', 'detection/retinanet', 'coco', (18.7, 27.1, 52.9)),
        ('Mask R-CNN', 'detection/mask_rcnn', 'coco', (28.7, 37.1, 62.2)),
        ('Semantic FPN', 'segmentation/fpn', 'ade20k', (12.8, 21.1, 46.3)),
    ]
    for arch, params in zip('sml', param_list)
]

DEFAULT_SHAPES = {'imagenet': [(224, 224)], 'mmdet': [(1280, 800)],
                  'mmseg': [(2048, 512), (512, 512)]}


def imagenet_model(arch: str) -> nn.Module:
    """The paper's ImageNet classifier: the timm model ``convmlp_{arch}``."""
    import timm

    import mmconvmlp  # noqa: F401  (registers convmlp_s/m/l)
    return timm.create_model(f'convmlp_{arch}', pretrained=False)


def config_model(config: str):
    """``(model, scope)`` of an mmdet or mmseg config (a file, or a stock config named as in
    ``_base_``: ``mmseg::upernet/...``), built without its weights."""
    from mmengine.config import Config

    from mmconvmlp.config_models import build_config_model, resolve_config
    cfg = Config.fromfile(resolve_config(config))
    return build_config_model(cfg), cfg.default_scope


class TensorForward(nn.Module):
    """Wraps a detector or segmentor so that a traced call takes just the image."""

    def __init__(self, model: nn.Module, scope: str, width: int, height: int):
        super().__init__()
        self.model, self.scope = model, scope
        self.width, self.height = width, height

    def forward(self, x):
        if self.scope == 'mmdet':
            from mmdet.structures import DetDataSample
            sample = DetDataSample(metainfo=dict(
                img_shape=(self.height, self.width), ori_shape=(self.height, self.width),
                pad_shape=(self.height, self.width), batch_input_shape=(self.height,
                                                                        self.width),
                scale_factor=(1.0, 1.0)))
            return self.model(x, [sample], mode='tensor')
        return self.model(x, None, mode='tensor')


def count(model: nn.Module, width: int, height: int, scope: str = 'imagenet'):
    """(GMACs, M parameters) for one 3 x height x width image."""
    from mmengine.analysis import FlopAnalyzer
    model.eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    wrapped = model if scope == 'imagenet' else TensorForward(model, scope, width, height)
    inputs = torch.randn(1, 3, height, width)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        analyzer = FlopAnalyzer(wrapped, inputs)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        macs = analyzer.total() / 1e9
    return macs, params


def fmt(value, digits=1):
    return '-' if value is None else f'{value:.{digits}f}'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', choices=['all', 'imagenet', 'detection', 'segmentation'],
                        default='all', help='which of the paper\'s models to count')
    parser.add_argument('--config', help='count this config instead (mmdet or mmseg; a file '
                        'or a stock config such as mmdet::retinanet/retinanet_r50_fpn_1x_coco.py)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('WIDTH', 'HEIGHT'),
                        help='input size instead of the defaults (224x224 ImageNet, '
                             '1280x800 detection, 2048x512 and 512x512 segmentation)')
    args = parser.parse_args(argv)
    logging.getLogger('mmengine').setLevel(logging.ERROR)
    torch.set_grad_enabled(False)

    if args.config:
        rows = [(osp.splitext(osp.basename(args.config))[0], args.config, None, None, None)]
    else:
        wanted = {'all': ('imagenet', 'detection', 'segmentation'),
                  'imagenet': ('imagenet',), 'detection': ('detection',),
                  'segmentation': ('segmentation',)}[args.models]
        rows = [row for row in MODELS if (row[1] is None and 'imagenet' in wanted) or
                (row[1] is not None and row[1].split('/')[1] in wanted)]

    header = (f'| model | input (W x H) | params paper (M) | params measured (M) '
              f'| GMACs paper | GMACs measured |')
    print(header)
    print('|---|---|---|---|---|---|')
    for name, config, arch, paper_params, paper_macs in rows:
        if config is None:
            model, scope = imagenet_model(arch), 'imagenet'
        else:
            path = (config if '::' in config or osp.isabs(config) or osp.exists(config)
                    else osp.join(ROOT, config))
            model, scope = config_model(path)
        shapes = [tuple(args.shape)] if args.shape else DEFAULT_SHAPES.get(scope, [(224, 224)])
        for width, height in shapes:
            macs, params = count(model, width, height, scope)
            print(f'| {name} | {width} x {height} | {fmt(paper_params)} | {params:.2f} '
                  f'| {fmt(paper_macs)} | {macs:.2f} |', flush=True)


if __name__ == '__main__':
    from mmconvmlp.engine import install_excepthook
    install_excepthook()  # mmconvmlp's readable errors print without a traceback
    main()
