"""Evaluate a checkpoint of a detector (mmdet 3.x config) or a segmentor (mmseg 1.x
config), ConvMLP backbones included.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out PATH] [--show]
                         [--show-dir DIR] [--tta] [--precision P] [--cfg-options KEY=VALUE ...]
                         [--launcher {none,pytorch,slurm,mpi}]

The metrics are printed and written as JSON to WORK_DIR/TIMESTAMP/TIMESTAMP.json.
Several processes: ``bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [options]``.

A front end over :class:`mmconvmlp.engine.ConvMLPRunner` (the runner every config here
names, which MMDetection's own tools/test.py builds too), for other configs as well.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import ConfigDict  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402

from mmconvmlp.engine import install_excepthook  # noqa: E402
from mmconvmlp.engine.command_line import load_config, make_parser  # noqa: E402
from mmconvmlp.engine.inference_precision import (PRECISIONS,  # noqa: E402
                                                  prepare_inference)

PICKLE = ('.pkl', '.pickle')


def parse_args(argv=None):
    parser = make_parser('Test an MMDetection or MMSegmentation model.',
                         'where the logs and the metrics JSON go')
    parser.add_argument('checkpoint', help='checkpoint file (path or URL)')
    parser.add_argument(
        '--out', help='save the predictions: in a .pkl/.pickle file, or, for '
                      'segmentation configs, as PNG label maps in this folder')
    parser.add_argument('--show', action='store_true', help='display the predictions')
    parser.add_argument('--show-dir', help='save the images with the predictions drawn '
                        'on them here (detection configs: inside the run\'s timestamped '
                        'folder of the work dir)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each image is shown with --show')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation with '
                        'the config\'s tta_model and tta_pipeline')
    parser.add_argument('--precision', choices=PRECISIONS, default='float32',
                        help='float32 (default), auto (bfloat16 where the CPU or GPU has '
                             'bfloat16 units, float16 on older GPUs), bfloat16 or float16: '
                             'backbone, neck and heads in it, post-processing in float32')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Test the checkpoint; returns the metrics."""
    install_excepthook()  # mmconvmlp's readable errors print without a traceback
    args = parse_args(argv)
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    # A test run builds nothing of training. mmseg 1.2.2's SegVisualizationHook (--show,
    # --show-dir) draws with step=runner.iter, which builds the training loop, and with it
    # the training data set, unless there is none.
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper', 'param_scheduler'):
        cfg[key] = None
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        sys.exit(f'No such checkpoint file: {args.checkpoint}')
    scope = cfg.get('default_scope')

    if args.show or args.show_dir:
        hook = cfg.get('default_hooks', {}).get('visualization')
        if hook is None:
            sys.exit('--show/--show-dir need a visualization hook in default_hooks.')
        hook.draw = True
        hook.interval = 1  # every image (mmseg's hook draws every 50th by default)
        if args.show:
            hook.show, hook.wait_time = True, args.wait_time
        if args.show_dir and scope == 'mmdet':
            hook.test_out_dir = args.show_dir
        elif args.show_dir:
            # The visualizer is a named instance per process: a run in a process that made
            # one before (an Inferencer, an earlier main()) would get that one, which saves
            # elsewhere, unless the name goes with the folder.
            cfg.visualizer.save_dir = args.show_dir
            cfg.visualizer.name = f'show_dir:{osp.abspath(args.show_dir)}'
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            sys.exit(f'--tta: {args.config} defines no tta_model and tta_pipeline.')
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    if args.out and not args.out.endswith(PICKLE):
        if scope != 'mmseg':
            sys.exit('--out: give a .pkl or .pickle file to save the predictions in.')
        cfg.test_evaluator.output_dir = args.out

    runner = RUNNERS.build(cfg)
    if args.out and args.out.endswith(PICKLE):
        if scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults as Dump
        else:
            from mmengine.evaluator import DumpResults as Dump
        runner.test_evaluator.metrics.append(Dump(out_file_path=args.out))
    print_log(f'Inference precision: {prepare_inference(runner.model, args.precision)}',
              logger='current')
    return runner.test()


if __name__ == '__main__':
    main()
