"""Write the shapes demo data set (COCO and ADE20K layouts) under --out.

    python tools/make_shapes_dataset.py                  # data/shapes, the demo's settings
    python tools/make_shapes_dataset.py --num-train 50 --num-val 10 --out /tmp/shapes
"""
import argparse
import time

from mmconvmlp.datasets import DEFAULT_CLASSES, write_shapes_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/shapes', help='output folder (data/shapes)')
    parser.add_argument('--num-train', type=int, default=800, help='training images (800)')
    parser.add_argument('--num-val', type=int, default=100, help='validation images (100)')
    parser.add_argument('--image-size', type=int, default=160, help='image side in pixels (160)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (0)')
    parser.add_argument('--classes', nargs='+', default=list(DEFAULT_CLASSES),
                        help=f'category names (default: {" ".join(DEFAULT_CLASSES)})')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    paths = write_shapes_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                 image_size=args.image_size, seed=args.seed,
                                 class_names=tuple(args.classes))
    print(f'shapes data set: {args.num_train} train + {args.num_val} val images of '
          f'{args.image_size}x{args.image_size} px, seed {args.seed}, written in '
          f'{time.time() - start:.1f} s')
    for key, path in paths.items():
        print(f'  {key}: {path}')


if __name__ == '__main__':
    main()
