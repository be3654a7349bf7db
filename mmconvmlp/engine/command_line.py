"""What ``tools/train.py`` and ``tools/test.py`` share: the options both take and the
config they build a :class:`~.runner.ConvMLPRunner` from. A ``--cfg-options`` key that the
config lacks but that is one or two letters away from a key it has at the same level (a
likely typo, which mmengine would add as a new key that nothing reads) gives a warning
naming both; other new keys (``randomness.seed=0``) are added silently, as mmengine adds
them."""
import argparse
import logging
import os
import os.path as osp
import sys
from typing import Any, List, Mapping, Optional

from mmengine.config import Config, DictAction
from mmengine.logging import print_log


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


def edit_distance(a: str, b: str) -> int:
    """The Levenshtein distance: the fewest letters to insert, delete or replace."""
    previous = list(range(len(b) + 1))
    for i, letter in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (letter != other)))
        previous = current
    return previous[-1]


def _close_key(key: str, keys) -> Optional[str]:
    """The key of ``keys`` a likely typo ``key`` was meant to be: at most one letter off
    for names of up to 5 letters, two for longer ones; None when none is that close."""
    limit = 1 if len(key) <= 5 else 2
    scored = sorted((edit_distance(key, k), k) for k in keys if isinstance(k, str))
    return scored[0][1] if scored and scored[0][0] <= limit else None


def likely_typos(cfg: Mapping[str, Any], options: Mapping[str, Any]) -> List[str]:
    """A warning for each dotted key of ``options`` that leaves ``cfg`` at a level where the
    key is missing and close to one that is there (see the module)."""
    warnings = []
    for dotted in options:
        node: Any = cfg
        parts = str(dotted).split('.')
        for depth, part in enumerate(parts):
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, Mapping):
                break
            if part in node:
                node = node[part]
                continue
            meant = _close_key(part, node.keys())
            if meant is not None:
                where = '.'.join(parts[:depth] + [meant])
                warnings.append(
                    f'--cfg-options {dotted}: the config has no {".".join(parts[:depth + 1])}; '
                    f'did you mean {where}? It is added as a new key, which nothing may read.')
            break
    return warnings


def load_config(args) -> Config:
    """The config of ``args.config`` with ``--cfg-options``, ``--launcher`` and the work
    dir applied, built by :class:`~.runner.ConvMLPRunner` unless it names another runner
    type. Exits with a message for a config without a ``default_scope``."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        for warning in likely_typos(cfg.to_dict(), args.cfg_options):
            print_log(warning, logger='current', level=logging.WARNING)
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
