"""What ``tools/train.py`` and ``tools/test.py`` share: the options both take and the
config they build a :class:`~.runner.ConvMLPRunner` from."""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction


class ConfigOptions(DictAction):
    """mmengine's ``DictAction`` (``KEY=VALUE`` pairs into a dict), with a usage error for a
    pair without ``=`` instead of a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        for pair in values or ():
            if '=' not in pair:
                parser.error(f'{option_string} takes KEY=VALUE pairs; "{pair}" has no "=".')
        super().__call__(parser, namespace, values, option_string)


def make_parser(description: str, work_dir_help: str) -> argparse.ArgumentParser:
    """An argument parser with the options the two tools share: ``config``,
    ``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local_rank``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help=f'{work_dir_help} (default: the config\'s '
                        'work_dir, else work_dirs/CONFIG_NAME)')
    parser.add_argument('--cfg-options', nargs='+', action=ConfigOptions, metavar='KEY=VALUE',
                        help='override config entries, e.g. train_cfg.max_epochs=1 '
                             'test_dataloader.batch_size=2 (lists: key="[a,b]")')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='how the processes were started')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)
    return parser


def load_config(args) -> Config:
    """The config of ``args.config`` with ``--cfg-options``, ``--launcher`` and the work
    dir applied, built by :class:`~.runner.ConvMLPRunner` unless it names another runner
    type. Exits with a message for a config without a ``default_scope``."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if not cfg.get('default_scope'):
        sys.exit(f'{args.config} sets no default_scope: it should inherit from an mmdet '
                 "('mmdet') or mmseg ('mmseg') base config.")
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif not cfg.get('work_dir'):
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.setdefault('runner_type', 'ConvMLPRunner')
    return cfg
