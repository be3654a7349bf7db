"""Write the shapes demo data set (COCO and ADE20K layouts) under --out.

    python tools/make_shapes_dataset.py                  # data/shapes, the demo's settings
    python tools/make_shapes_dataset.py --num-train 50 --num-val 10 --out /tmp/shapes
"""
import argparse
import hashlib
import json
import os.path as osp
import time

from mmconvmlp.datasets import DEFAULT_CLASSES, shapes, write_shapes_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/shapes', help='output folder (data/shapes)')
    parser.add_argument('--num-train', type=int, default=1000, help='training images (1000)')
    parser.add_argument('--num-val', type=int, default=100, help='validation images (100)')
    parser.add_argument('--image-size', type=int, default=96, help='image side in pixels (96)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (0)')
    parser.add_argument('--classes', nargs='+', default=list(DEFAULT_CLASSES),
                        help=f'category names (default: {" ".join(DEFAULT_CLASSES)})')
    parser.add_argument('--force', action='store_true',
                        help='write again even when --out holds this very data set')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = dict(num_train=args.num_train, num_val=args.num_val,
                    image_size=args.image_size, seed=args.seed, classes=list(args.classes))
    # A change of the generator's code makes the data stale too.
    with open(shapes.__file__, 'rb') as f:
        settings['generator'] = hashlib.sha256(f.read()).hexdigest()[:16]
    stamp = osp.join(args.out, 'settings.json')
    if not args.force and osp.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                print(f'shapes data set: {args.out} already holds it; '
                      f'--force writes it again')
                return
    start = time.time()
    paths = write_shapes_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                 image_size=args.image_size, seed=args.seed,
                                 class_names=tuple(args.classes))
    print(f'shapes data set: {args.num_train} train + {args.num_val} val images of '
          f'{args.image_size}x{args.image_size} px, seed {args.seed}, written in '
          f'{time.time() - start:.1f} s')
    for key, path in paths.items():
        print(f'  {key}: {path}')
    with open(stamp, 'w') as f:
        json.dump(settings, f)


if __name__ == '__main__':
    main()
