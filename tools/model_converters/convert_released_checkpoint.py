"""Convert a released ConvMLP COCO / ADE20K checkpoint (MMDetection 2.x / MMSegmentation 0.x)
into one that ``tools/test.py`` and ``tools/dist_test.sh`` load on today's stack.

    python tools/model_converters/convert_released_checkpoint.py IN OUT [--config CONFIG]

The input is read without unpickling arbitrary objects: tensors load; metadata objects
outside torch's ``weights_only`` allowlist (numpy values, mmcv configs, ...) are kept only
as text and nothing they name is imported or run. The parameter names are checked against
the model of the matching config (read off the weights, e.g.
configs/detection/mask_rcnn_convmlp_m_coco.py) or of --config. The output holds
``state_dict`` and plain ``meta`` (classes, palette, the old metadata as text); the
optimizer state is left out. Exits with status 1, naming the entries, when something cannot
be mapped or does not fit the model, and naming what the file asks for when its pickle would
restore state into anything but what the reader creates; nothing is written then.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert a released ConvMLP detection/segmentation checkpoint '
                    '(MMDetection 2.x / MMSegmentation 0.x) for MMDetection 3.x / '
                    'MMSegmentation 1.x.')
    parser.add_argument('src', help='the downloaded checkpoint')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--config', help='the config the weights are for (default: the '
                        "repository's config matching the weights)")
    parser.add_argument('--no-check', action='store_true',
                        help='do not check the names and shapes against the model')
    parser.add_argument('--allow-unmapped', action='store_true',
                        help='drop (and list) entries that belong to no detector or '
                             'segmentor part instead of stopping')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmconvmlp.checkpoints import convert_released_checkpoint
    from mmconvmlp.engine import ReadableError
    from mmconvmlp.models import CheckpointMismatchError
    try:
        report = convert_released_checkpoint(args.src, args.dst, config=args.config,
                                             check=not args.no_check,
                                             allow_unmapped=args.allow_unmapped)
    except (CheckpointMismatchError, ReadableError) as error:
        print(f'Not converted: {error}', file=sys.stderr)
        return 1
    print(report.summary(), end='')
    print(f'written: {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
