"""Train a detector (mmdet 3.x config) or a segmentor (mmseg 1.x config), ConvMLP
backbones included.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
                          [--auto-scale-lr] [--cfg-options KEY=VALUE ...]
                          [--launcher {none,pytorch,slurm,mpi}]

Several processes: ``bash tools/dist_train.sh CONFIG NUM_PROCESSES [options]`` (GPUs, or
gloo processes on the CPU when there is no CUDA); on Slurm, ``sbatch tools/slurm_sbatch.sh``.

Exit status: 0 when training ended, 75 when SIGTERM or SIGUSR1 stopped it after saving the
current iteration (``--resume`` continues from it; mmconvmlp/engine/preemption.py), 1 on
an error.

A front end over :class:`mmconvmlp.engine.ConvMLPRunner` (the runner every config here
names, which MMDetection's own tools/train.py builds too), for other configs as well.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.registry import RUNNERS  # noqa: E402

from mmconvmlp.engine import install_excepthook  # noqa: E402
from mmconvmlp.engine.command_line import load_config, make_parser  # noqa: E402
from mmconvmlp.engine.precision import use_amp  # noqa: E402


def parse_args(argv=None):
    parser = make_parser('Train an MMDetection or MMSegmentation model.',
                         'where logs and checkpoints go')
    parser.add_argument(
        '--resume', nargs='?', const='auto', metavar='CHECKPOINT',
        help='continue a run: from CHECKPOINT, or, with no value, from the latest '
             'checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision: float16 with dynamic loss scaling '
                             'on CUDA; without CUDA bfloat16 autocast where the CPU runs '
                             'bfloat16 fast, else float32')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual total batch size over '
                             'the config\'s auto_scale_lr.base_batch_size')
    return parser.parse_args(argv)


def main(argv=None):
    install_excepthook()  # mmconvmlp's readable errors print without a traceback
    args = parse_args(argv)
    cfg = load_config(args)
    if args.amp:
        use_amp(cfg)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            sys.exit('--auto-scale-lr needs auto_scale_lr = dict(base_batch_size=...) in '
                     'the config: the total batch size its learning rate was set for.')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':  # the latest checkpoint of the work dir
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if '://' not in args.resume and not osp.isfile(args.resume):
            sys.exit(f'--resume {args.resume}: no such checkpoint file.')
        cfg.resume, cfg.load_from = True, args.resume
    RUNNERS.build(cfg).train()


if __name__ == '__main__':
    main()
