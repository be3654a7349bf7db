"""Preemption and multi-process resumes end to end on the shapes demo configs, as a user runs
them (tools/train.py, dist_train.sh; 16 training images, batch 2, seed 0, float32, one
thread a process). Minutes of training: marked ``cluster`` and left out of the default
run; ``pytest -m cluster tests`` runs them. The same behaviour on a toy training, in
seconds, is in test_preemption.py."""
import os.path as osp
import signal
import subprocess
import time

import pytest
import torch

from mmconvmlp.datasets import write_shapes_dataset
from mmconvmlp.engine.preemption import PREEMPTED_EXIT_CODE
from test_preemption import ENV, assert_same_weights, signal_hook, train, train_log
from test_tools import ROOT, TIMEOUT, tool

pytestmark = pytest.mark.cluster

RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_shapes.py')
SEM_FPN = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_shapes.py')
COMMON = ['train_dataloader.batch_size=2', 'optim_wrapper.precision=float32',
          'randomness.seed=0', 'default_hooks.logger.interval=1', 'val_dataloader.batch_size=2']
RETINANET_OPTIONS = ['--cfg-options', *COMMON, 'train_cfg.max_epochs=2',
                     'param_scheduler.0.end=8', 'param_scheduler.1.end=2',
                     'param_scheduler.1.T_max=2']
FPN_OPTIONS = ['--cfg-options', *COMMON, 'train_cfg.max_iters=60', 'train_cfg.val_interval=60',
               'default_hooks.checkpoint.interval=20', 'param_scheduler.0.end=10',
               'param_scheduler.1.begin=10', 'param_scheduler.1.end=60']


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """A folder with data/shapes (16 training images, 2 validation images, 96x96)."""
    folder = tmp_path_factory.mktemp('demos')
    write_shapes_dataset(str(folder / 'data' / 'shapes'), num_train=16, num_val=2,
                         image_size=96, seed=0)
    return folder


def derived(config, folder, name, extra):
    """``config`` plus ``extra``, with tests/toy_training.py's hooks importable."""
    path = folder / f'{name}.py'
    path.write_text(f'_base_ = {config!r}\n'
                    "custom_imports = dict(imports=['mmconvmlp', 'mmconvmlp.engine', "
                    "'toy_training'], allow_failed_imports=False)\n" + extra)
    return path


def test_sigterm_mid_epoch_2_of_the_retinanet_demo(root):
    """SIGTERM from outside once iteration 10 (epoch 2, batch 2 of 8) is logged: a
    checkpoint of the iteration the run was at comes within 60 s, with exit code 75; the
    resume trains only the rest of epoch 2, and its epoch_2.pth equals the uninterrupted
    run's, tensor for tensor."""
    config = derived(RETINANET, root, 'retinanet', '')
    train(config, root / 'retinanet_whole', *RETINANET_OPTIONS)

    work = root / 'retinanet_signalled'
    process = subprocess.Popen(
        tool('train.py', config, '--work-dir', work, *RETINANET_OPTIONS), cwd=root,
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (list(work.glob('*/*.log')) and 'Epoch(train) [2][2/8]' in train_log(work)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    while (work / 'last_checkpoint').read_text() == str(work / 'epoch_1.pth'):
        assert time.monotonic() - sent < 60
        time.sleep(0.2)
    assert process.wait(timeout=60) == PREEMPTED_EXIT_CODE, process.stderr.read()[-3000:]
    saved = (work / 'last_checkpoint').read_text()
    iteration = torch.load(saved)['meta']['iter']
    name = 'epoch_2.pth' if iteration == 16 else f'iter_{iteration}.pth'  # 16: epoch 2 ended
    assert 10 <= iteration <= 16 and saved == str(work / name)

    train(config, work, '--resume', *RETINANET_OPTIONS)
    log = train_log(work)
    assert log.count('Epoch(train) [2]') == 16 - iteration
    assert 'Epoch(train) [1]' not in log
    assert_same_weights(root / 'retinanet_whole' / 'epoch_2.pth', work / 'epoch_2.pth')


def test_sigterm_at_iteration_30_of_the_semantic_fpn_demo(root):
    """Iteration-based, 60 iterations, a checkpoint every 20: SIGTERM after iteration 30
    saves iter_30.pth; resumed to 60, the run ends with the uninterrupted run's weights."""
    whole = derived(SEM_FPN, root, 'fpn', '')
    signalled = derived(SEM_FPN, root, 'fpn_signalled', signal_hook(30))
    train(whole, root / 'fpn_whole', *FPN_OPTIONS)
    work = root / 'fpn_signalled'
    train(signalled, work, *FPN_OPTIONS, expect_rc=PREEMPTED_EXIT_CODE)
    assert (work / 'last_checkpoint').read_text() == str(work / 'iter_30.pth')
    assert (work / 'iter_20.pth').is_file() and not (work / 'iter_40.pth').exists()

    train(signalled, work, '--resume', *FPN_OPTIONS)
    assert train_log(work).count('Iter(train) [') == 30
    assert_same_weights(root / 'fpn_whole' / 'iter_60.pth', work / 'iter_60.pth')


def test_two_processes_rank_1_killed_in_epoch_2_of_the_retinanet_demo(root):
    """dist_train.sh with 2 gloo processes (4 iterations an epoch), rank 1 killed with -9
    after iteration 6, resumed with 2 processes from epoch_1.pth: epoch_2.pth equals an
    uninterrupted 2-process run's."""
    whole = derived(RETINANET, root, 'retinanet_2', '')
    killed = derived(RETINANET, root, 'retinanet_2_killed',
                     signal_hook(6, 'SIGKILL', ranks=(1,)))
    train(whole, root / 'two_whole', *RETINANET_OPTIONS, processes=2)
    work = root / 'two_killed'
    train(killed, work, *RETINANET_OPTIONS, processes=2, expect_rc=1)
    assert (work / 'last_checkpoint').read_text().endswith('epoch_1.pth')
    train(whole, work, '--resume', *RETINANET_OPTIONS, processes=2)
    assert_same_weights(root / 'two_whole' / 'epoch_2.pth', work / 'epoch_2.pth')
