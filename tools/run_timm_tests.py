"""Run timm's own model tests (``tests/test_models.py`` of the installed timm version's
source) on convmlp_s/m/l.

    python tools/run_timm_tests.py                     # convmlp_s, convmlp_m, convmlp_l
    python tools/run_timm_tests.py --models convmlp_s -- -x -q
    python tools/run_timm_tests.py --timm-source ~/src/pytorch-image-models   # a checkout

timm's source distribution of the installed version comes from the package registry
(``pip download --no-binary :all: timm==VERSION``, a few MB) into ``--cache``, unless
``--timm-source`` names a folder that holds timm's ``tests/``. The tests run in a pytest
started in this process after ``import mmconvmlp``, so that timm's test module lists the
ConvMLP models when it collects its cases; ``-k`` keeps the cases of the chosen models,
except those that download weights (:data:`NETWORK_CASES`). Arguments after ``--`` go to pytest. Exits with pytest's status.
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
import tarfile
import tempfile

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = ('convmlp_s', 'convmlp_m', 'convmlp_l')
#: timm's cases that download weights from the Hugging Face Hub (the released ConvMLP
#: weights are not there): left out, and named in the output.
NETWORK_CASES = ('test_model_load_pretrained', 'test_model_features_pretrained',
                 'test_model_inference')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    parser.add_argument('--timm-source', help='a folder holding timm\'s tests/ (default: the '
                                              'source distribution of the installed timm)')
    parser.add_argument('--cache', default=osp.join(osp.expanduser('~'), '.cache',
                                                    'mmconvmlp'),
                        help='where the downloaded source distribution is kept')
    parser.add_argument('pytest_args', nargs='*', help='after --: arguments for pytest')
    return parser.parse_args()


def timm_source(version: str, cache: str) -> str:
    """The folder of timm's source distribution of ``version``, downloaded into ``cache``
    from the package registry on first use. Exits with a message where it cannot be had."""
    folder = osp.join(cache, f'timm-{version}')
    if osp.isfile(osp.join(folder, 'tests', 'test_models.py')):
        return folder
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download:
        # The registry's configuration only: a local wheel folder has no source distributions.
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
        result = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
             '--disable-pip-version-check', '-d', download, f'timm=={version}'],
            capture_output=True, text=True, env=env, timeout=600)
        archives = [name for name in os.listdir(download) if name.endswith('.tar.gz')]
        if result.returncode or not archives:
            sys.exit(f'Could not download the source distribution of timm=={version} from the '
                     f'package registry (pip said: {result.stderr.strip()[-300:]}). Give a '
                     f'folder holding timm\'s tests/ with --timm-source.')
        with tarfile.open(osp.join(download, archives[0])) as archive:
            archive.extractall(cache, filter='data')
    if not osp.isfile(osp.join(folder, 'tests', 'test_models.py')):
        sys.exit(f'The source distribution of timm=={version} holds no tests/test_models.py: '
                 f'give a checkout of timm at that version with --timm-source.')
    return folder


def main() -> int:
    args = parse_args()
    import timm

    source = args.timm_source or timm_source(timm.__version__, args.cache)
    tests = osp.join(source, 'tests', 'test_models.py')
    if not osp.isfile(tests):
        sys.exit(f'{tests} does not exist: give a folder holding timm\'s tests/.')
    import pytest

    import mmconvmlp  # noqa: F401  (registers convmlp_s/m/l before timm's tests list models)
    selection = (f'({" or ".join(args.models)}) and not '
                 f'{" and not ".join(NETWORK_CASES)}')
    print(f'timm {timm.__version__}: {tests} on {", ".join(args.models)}, without the cases '
          f'that download weights ({", ".join(NETWORK_CASES)})', flush=True)
    os.chdir(source)
    return pytest.main([tests, '-k', selection, '-p', 'no:cacheprovider', '-q',
                        '-W', 'ignore::pytest.PytestUnknownMarkWarning', *args.pytest_args])


if __name__ == '__main__':
    sys.exit(main())
