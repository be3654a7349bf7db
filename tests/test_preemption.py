"""Cluster life on a toy training (tests/toy_training.py, a second a run): a preemption
signal saves the iteration and exits with 75, and the resume ends with the weights of an
uninterrupted run, with one process or two (killed with -9 or signalled on one rank);
SIGTERM to torchrun stops its processes with a checkpoint; a fake Slurm requeues and
resumes; resumes with another layout continue at the right sample or stop with one message;
a failed save, a busy work dir and orphaned workers. The same on the demo configs, end to
end, is in test_preemption_demos.py (marker ``cluster``)."""
import itertools
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
from mmengine.config import Config

import toy_training
from mmconvmlp.engine import ConvMLPRunner
from mmconvmlp.engine.atomic_save import CheckpointSaveError
from mmconvmlp.engine.preemption import PREEMPTED_EXIT_CODE, PreemptionHook
from mmconvmlp.engine.resume_state import ResumeMismatchError
from mmconvmlp.engine.weights_fit import WeightsMismatchError
from mmconvmlp.engine.work_dir_lock import WorkDirBusyError
from test_tools import ROOT, free_port, run, tool

TESTS = osp.dirname(osp.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), OMP_NUM_THREADS='1',
           MKL_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONWARNINGS='ignore',
           PYTHON=sys.executable)


def signal_hook(iteration, signal_name='SIGTERM', ranks=(0,), again_while_saving=False,
                parent=False):
    return (f"custom_hooks = [dict(type='SignalAfterIteration', iteration={iteration}, "
            f"signal_name={signal_name!r}, ranks={tuple(ranks)!r}, "
            f"again_while_saving={again_while_saving}, parent={parent})]\n")


def train(config, work_dir, *args, processes=1, expect_rc=0):
    if processes == 1:
        cmd, env = tool('train.py', config, '--work-dir', work_dir, *args), ENV
    else:
        cmd = ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), str(config), str(processes),
               '--work-dir', str(work_dir), *args]
        env = dict(ENV, PORT=free_port())
    return run(cmd, osp.dirname(config), env, expect_rc=expect_rc)


def train_log(work_dir) -> str:
    return open(sorted(work_dir.glob('*/*.log'))[-1]).read()


def assert_same_weights(expected_path, resumed_path):
    expected = torch.load(expected_path)['state_dict']
    resumed = torch.load(resumed_path)['state_dict']
    assert expected.keys() == resumed.keys()
    differing = [key for key in expected if not torch.equal(expected[key], resumed[key])]
    assert not differing, f'{len(differing)} of {len(expected)} tensors differ'


@pytest.mark.parametrize('by_epoch,signal_name,iteration,workers', [
    (True, 'SIGTERM', 9, 1), (False, 'SIGUSR1', 8, 0)],
    ids=['sigterm_mid_epoch_with_a_worker', 'sigusr1_by_iteration_without_workers'])
def test_a_signal_saves_the_iteration_and_the_resume_ends_as_uninterrupted(
        tmp_path, by_epoch, signal_name, iteration, workers):
    """The signal comes after iteration 9 of 18 (epoch 2 of 3, batch 3 of 6) or 8 (between
    the checkpoints of 6 and 12), once more while the checkpoint is written: exit code 75,
    one log line, that iteration saved and named in last_checkpoint; --resume trains the
    other iterations only and ends with the uninterrupted run's weights."""
    whole = toy_training.write_config(tmp_path / 'whole.py', by_epoch, workers)
    signalled = toy_training.write_config(
        tmp_path / 'signalled.py', by_epoch, workers,
        extra=signal_hook(iteration, signal_name, again_while_saving=True))
    train(whole, tmp_path / 'whole')
    result = train(signalled, tmp_path / 'run', expect_rc=PREEMPTED_EXIT_CODE)
    assert 'Traceback' not in result.stderr
    saved = tmp_path / 'run' / f'iter_{iteration}.pth'
    lines = [line for line in train_log(tmp_path / 'run').splitlines() if 'received' in line]
    at = f'epoch 2, iteration {iteration}' if by_epoch else f'iteration {iteration}'
    assert len(lines) == 1 and lines[0].endswith(
        f'{signal_name} received: saved {saved} ({at}) and stopping with exit code 75; '
        'train with --resume to continue from it.')
    assert (tmp_path / 'run' / 'last_checkpoint').read_text() == str(saved)
    assert torch.load(saved)['meta']['iter'] == iteration

    train(signalled, tmp_path / 'run', '--resume')
    log = train_log(tmp_path / 'run')
    assert f'Auto resumed from the latest checkpoint {saved}' in log
    trained = log.count('Epoch(train)' if by_epoch else 'Iter(train)')
    assert trained == 18 - iteration
    last = 'epoch_3.pth' if by_epoch else 'iter_18.pth'
    assert_same_weights(tmp_path / 'whole' / last, tmp_path / 'run' / last)


@pytest.mark.parametrize('by_epoch,val_interval,after,saved,at', [
    (False, 6, 12, 'iter_12.pth', 'during the validation after iteration 12'),
    (True, 1, 12, 'epoch_2.pth', 'during the validation after epoch 2'),
    (False, 4, 8, 'iter_9.pth', None)],
    ids=['checkpoint_before_it', 'by_epoch', 'no_checkpoint_before_it'])
def test_a_signal_during_validation(tmp_path, by_epoch, val_interval, after, saved, at):
    """A checkpoint every 6 iterations (every epoch of 6), the signal after batch 2 of 4 of
    the validation after iteration ``after``. Where the checkpoint just saved holds the
    training as it is, the validation stops there, at once. Validating every 4, no
    checkpoint holds iteration 8: its validation ends, and the next iteration is saved.
    Either resume ends with the weights of an uninterrupted run."""
    signal_in_validation = ("custom_hooks = [dict(type='SignalDuringValidation', "
                            f"iteration={after}, batch=2)]\n")
    whole, signalled = (toy_training.write_config(
        tmp_path / f'{name}.py', by_epoch, val_interval=val_interval, extra=extra)
        for name, extra in (('whole', ''), ('signalled', signal_in_validation)))
    train(whole, tmp_path / 'whole')
    train(signalled, tmp_path / 'run', expect_rc=PREEMPTED_EXIT_CODE)
    log = train_log(tmp_path / 'run')
    at = (f'{at}, which it holds; the rest of that validation is left out' if at
          else 'iteration 9')
    assert (f'SIGTERM received: saved {tmp_path / "run" / saved} ({at}) and stopping') in log
    assert (tmp_path / 'run' / 'last_checkpoint').read_text() == str(tmp_path / 'run' / saved)
    validated = re.findall(r'\(val\) (?:\[\d\])?\[(\d)/4\] +eta', log)  # a line a batch
    assert validated[-4:] == list('1234' if saved == 'iter_9.pth' else '3412')

    train(whole, tmp_path / 'run', '--resume')
    last = 'epoch_3.pth' if by_epoch else 'iter_18.pth'
    assert_same_weights(tmp_path / 'whole' / last, tmp_path / 'run' / last)


def test_two_processes_stop_in_validation_together(tmp_path):
    """Two processes (3 iterations an epoch, 2 validation batches each): rank 1 alone
    signalled in the validation after epoch 2; both stop there, exit code 75 from the
    launcher, with epoch_2.pth as the resume point."""
    config = toy_training.write_config(
        tmp_path / 'two.py', num_workers=0, val_interval=1,
        extra=("custom_hooks = [dict(type='SignalDuringValidation', iteration=6, batch=1, "
               "ranks=(1,))]\n"))
    train(config, tmp_path / 'work', processes=2, expect_rc=PREEMPTED_EXIT_CODE)
    saved = tmp_path / 'work' / 'epoch_2.pth'
    assert (tmp_path / 'work' / 'last_checkpoint').read_text() == str(saved)
    assert f'saved {saved} (during the validation after epoch 2,' in train_log(tmp_path / 'work')


def test_a_signal_after_an_epochs_last_iteration_saves_the_epoch(tmp_path):
    """The signal comes after iteration 9 (mid epoch 2), then, in the resumed epoch, after
    iteration 12, its last, with a checkpoint every 3 epochs: the epoch's end runs and
    epoch_2.pth is saved, so the next resume trains epoch 3 alone (not epoch 2 again) and
    ends with the uninterrupted run's weights."""
    every_3 = "default_hooks['checkpoint'] = dict(type='CheckpointHook', interval=3)\n"
    whole = toy_training.write_config(tmp_path / 'whole.py', extra=every_3)
    at_9, at_12 = (toy_training.write_config(tmp_path / f'at_{n}.py',
                                             extra=every_3 + signal_hook(n))
                   for n in (9, 12))
    train(whole, tmp_path / 'whole')
    train(at_9, tmp_path / 'run', expect_rc=PREEMPTED_EXIT_CODE)
    train(at_12, tmp_path / 'run', '--resume', expect_rc=PREEMPTED_EXIT_CODE)
    saved = tmp_path / 'run' / 'epoch_2.pth'
    assert (tmp_path / 'run' / 'last_checkpoint').read_text() == str(saved)
    meta = torch.load(saved)['meta']
    assert meta['epoch'] == 2 and meta['iter'] == 12
    log = train_log(tmp_path / 'run')
    assert log.count('Epoch(train)') == 3
    assert (f'SIGTERM received: saved {saved} (end of epoch 2, iteration 12) and stopping '
            'with exit code 75') in log
    train(whole, tmp_path / 'run', '--resume')
    assert train_log(tmp_path / 'run').count('Epoch(train)') == 6
    assert_same_weights(tmp_path / 'whole' / 'epoch_3.pth', tmp_path / 'run' / 'epoch_3.pth')


def test_two_processes_resume_as_uninterrupted_after_kill_or_signal(tmp_path):
    """Two gloo processes (dist_train.sh), no workers: every sample draws from its
    process's generators. Rank 1 killed with -9 in epoch 2 and resumed from epoch_1.pth;
    rank 1 alone signalled after iteration 4: both ranks stop there (exit code 75 from the
    launcher) and resume. Both end with the weights of an uninterrupted 2-process run. A
    resume of the signalled run with one process continues with a warning saying why it
    cannot be bit-identical."""
    whole = toy_training.write_config(tmp_path / 'whole.py', num_workers=0)
    killed = toy_training.write_config(tmp_path / 'killed.py', num_workers=0,
                                       extra=signal_hook(5, 'SIGKILL', ranks=(1,)))
    signalled = toy_training.write_config(tmp_path / 'signalled.py', num_workers=0,
                                          extra=signal_hook(4, 'SIGTERM', ranks=(1,)))
    train(whole, tmp_path / 'whole', processes=2)
    train(killed, tmp_path / 'killed', processes=2, expect_rc=1)
    assert (tmp_path / 'killed' / 'last_checkpoint').read_text().endswith('epoch_1.pth')
    train(signalled, tmp_path / 'signalled', processes=2, expect_rc=PREEMPTED_EXIT_CODE)
    assert (tmp_path / 'signalled' / 'last_checkpoint').read_text().endswith('iter_4.pth')
    other = tmp_path / 'one_process'
    other.mkdir()
    (other / 'iter_4.pth').write_bytes((tmp_path / 'signalled' / 'iter_4.pth').read_bytes())

    for name in ('killed', 'signalled'):  # (the config without the killing hook)
        train(whole if name == 'killed' else signalled, tmp_path / name, '--resume',
              processes=2)
        assert_same_weights(tmp_path / 'whole' / 'epoch_3.pth',
                            tmp_path / name / 'epoch_3.pth')

    train(signalled, other, '--resume', other / 'iter_4.pth')
    log = train_log(other)
    assert (f'{other}/iter_4.pth was saved after 4 samples of pass 2 over the training set '
            '(processes 2 -> 1). Training continues at that sample, but the result will not '
            'be bit-identical to an uninterrupted run: each of the 2 processes had its own '
            'random generators, which 1 processes cannot continue one to one') in log
    assert log.count('Epoch(train)') == 4 + 6  # the rest of epoch 2, then epoch 3


def test_sigterm_to_torchrun_stops_its_processes_with_a_checkpoint(tmp_path):
    """Kubernetes signals the container's first process: SIGTERM to the launcher of
    dist_train.sh (torchrun, 2 processes, a worker each) while it trains saves the iteration
    the processes were at (epoch_N.pth where that ended epoch N), names it in
    last_checkpoint, and exits with 75; no process is left."""
    config = toy_training.write_config(tmp_path / 'long.py', extra=(
        'train_cfg = dict(by_epoch=True, max_epochs=1000)\n'))
    work = tmp_path / 'work'
    launcher = subprocess.Popen(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), str(config), '2', '--work-dir',
         str(work)], cwd=tmp_path, env=dict(ENV, PORT=free_port()),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (work / 'epoch_2.pth').exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    children = psutil.Process(launcher.pid).children(recursive=True)
    launcher.send_signal(signal.SIGTERM)  # the launcher execs torchrun's agent
    assert launcher.wait(timeout=60) == PREEMPTED_EXIT_CODE, launcher.stderr.read()[-3000:]
    saved = (work / 'last_checkpoint').read_text()
    meta = torch.load(saved)['meta']  # 3 iterations an epoch; a finished epoch is epoch_N
    ended_an_epoch = meta['iter'] == 3 * meta['epoch']
    name = f'epoch_{meta["epoch"]}.pth' if ended_an_epoch else f'iter_{meta["iter"]}.pth'
    assert saved == str(work / name) and meta['iter'] > 6
    assert len(children) >= 4  # 2 processes, a worker each
    assert not [child for child in children if child.is_running()
                and child.status() != psutil.STATUS_ZOMBIE]


def test_torchrun_ending_a_slow_process_after_a_preemption_still_exits_with_75(tmp_path):
    """Rank 1 signalled after iteration 4; rank 0 takes 5 s more to end after the save, so
    torchrun, seeing rank 1 exit with 75, ends it with SIGTERM: the launcher still exits
    with 75 (both processes agreed and the checkpoint was saved before either exited)."""
    hooks = ("custom_hooks = [dict(type='SignalAfterIteration', iteration=4, "
             "ranks=(1,)), dict(type='SlowExit', seconds=5, ranks=(0,))]\n")
    config = toy_training.write_config(tmp_path / 'slow.py', num_workers=0, extra=hooks)
    result = train(config, tmp_path / 'work', processes=2, expect_rc=PREEMPTED_EXIT_CODE)
    assert 'closing signal SIGTERM' in result.stderr  # torchrun ended rank 0
    assert (tmp_path / 'work' / 'last_checkpoint').read_text().endswith('iter_4.pth')


SRUN_STATUS = {  # how the fake srun ends after its one task exited
    'as_the_task': 'exec "$@"\n',
    # --kill-on-bad-exit killed the other tasks when this one exited with 75: 128 + 9
    'kills_the_others': '"$@"; status=$?; [ "$status" = 75 ] && exit 137; exit "$status"\n',
}


@pytest.mark.parametrize('signal_name,srun', [
    ('SIGUSR1', 'as_the_task'), ('SIGTERM', 'as_the_task'), ('SIGUSR1', 'kills_the_others')])
def test_a_fake_slurm_job_requeues_itself_and_resumes(tmp_path, signal_name, srun):
    """tools/slurm_sbatch.sh under a fake srun and scontrol: SIGUSR1 (sent, as Slurm's
    --signal does, to the training process and its worker) or SIGTERM (sent, as preemption
    does, to the batch shell too, whose trap waits for the training) saves the iteration;
    the script requeues the job, also when srun reports 137 for the other tasks it killed
    (WORK_DIR/.preempted tells that the save was done); started again as a requeued job,
    it resumes and finishes."""
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'srun').write_text(
        '#!/usr/bin/env bash\n'
        'while [[ "$1" == --* ]]; do shift; done\n'
        'export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_NODELIST=localhost '
        'MASTER_ADDR=127.0.0.1\n' + SRUN_STATUS[srun])
    (fake / 'scontrol').write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol\n')
    for script in fake.iterdir():
        script.chmod(0o755)
    config = toy_training.write_config(
        tmp_path / 'job.py', extra=signal_hook(9, signal_name, parent=signal_name == 'SIGTERM'))
    env = dict(ENV, PATH=f'{fake}{os.pathsep}{os.environ["PATH"]}', SLURM_JOB_ID='4242',
               SLURM_SUBMIT_DIR=ROOT, MASTER_PORT=free_port())
    work = tmp_path / 'work'
    cmd = ['bash', osp.join(ROOT, 'tools', 'slurm_sbatch.sh'), str(config), str(work)]
    result = run(cmd, tmp_path, env, expect_rc=PREEMPTED_EXIT_CODE)
    trapped = 'slurm_sbatch: SIGTERM: waiting for the training to save its checkpoint'
    assert (trapped in result.stdout) == (signal_name == 'SIGTERM')
    killed = 'slurm_sbatch: srun exited with 137 after the training saved'
    assert (killed in result.stdout) == (srun == 'kills_the_others')
    assert (tmp_path / 'scontrol').read_text() == 'requeue 4242\n'
    assert (work / 'last_checkpoint').read_text().endswith('iter_9.pth')
    assert (work / '.preempted').read_text() == str(work / 'iter_9.pth')

    result = run(cmd, tmp_path, dict(env, SLURM_RESTART_COUNT='1'))
    assert 'slurm_sbatch: requeued 1 times so far; resuming from' in result.stdout
    log = train_log(work)
    assert 'Auto resumed from the latest checkpoint' in log and 'iter_9.pth' in log
    assert log.count('Epoch(train)') == 9
    assert (tmp_path / 'scontrol').read_text() == 'requeue 4242\n'  # not again
    assert not (work / '.preempted').exists()


RUNS = itertools.count()


def toy_runner(tmp_path, work_dir, **options) -> ConvMLPRunner:
    """The toy training in this process; ``options`` as --cfg-options."""
    config = toy_training.write_config(tmp_path / 'toy.py', num_workers=0)
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(dict(work_dir=str(work_dir), experiment_name=f'toy_{next(RUNS)}',
                             **options))
    return ConvMLPRunner.from_cfg(cfg)


def test_another_batch_size_resumes_at_the_right_sample_or_stops(tmp_path):
    """Batch 4 from a batch-2 checkpoint: from epoch_1.pth, epoch 2 trains all of its 3
    iterations (with a warning); from iter_7.pth, 2 samples into epoch 2, no batch of 4
    starts there: one message. A longer data set mid-epoch: one message."""
    work = tmp_path / 'work'
    toy_runner(tmp_path, work, **{'train_cfg.max_epochs': 2,
                                  'default_hooks.checkpoint.by_epoch': False,
                                  'default_hooks.checkpoint.interval': 7}).train()
    toy_runner(tmp_path, work, **{'train_cfg.max_epochs': 1}).train()
    assert (work / 'epoch_1.pth').is_file() and (work / 'iter_7.pth').is_file()

    resumed = tmp_path / 'batch_4'
    toy_runner(tmp_path, resumed, resume=True, load_from=str(work / 'epoch_1.pth'),
               **{'train_cfg.max_epochs': 2, 'train_dataloader.batch_size': 4}).train()
    log = train_log(resumed)
    assert 'was saved after 0 samples of pass 2 over the training set (batch size per ' \
        'process 2 -> 4). Training continues at that sample, but the result will not be ' \
        'bit-identical to an uninterrupted run: an iteration takes 4 samples instead of 2 ' \
        '(and the learning-rate schedule counts iterations).' in log
    assert log.count('Epoch(train)') == 3
    assert torch.load(resumed / 'epoch_2.pth')['meta']['iter'] == 6 + 3

    with pytest.raises(ResumeMismatchError) as error:
        toy_runner(tmp_path, tmp_path / 'mid_batch_4', resume=True,
                   load_from=str(work / 'iter_7.pth'),
                   **{'train_cfg.max_epochs': 2, 'train_dataloader.batch_size': 4}).train()
    assert str(error.value) == (
        f'{work}/iter_7.pth was saved after 2 samples of pass 2 over the training set '
        '(batch size per process 2 -> 4): this run trains 4 samples an iteration (1 x 4), '
        "which does not divide 2, so no iteration of it starts at the checkpoint's sample. "
        'Resume with a number of processes and a batch size whose product divides 2, e.g. '
        'those of the checkpoint (1 x 2).')
    with pytest.raises(ResumeMismatchError) as error:
        toy_runner(tmp_path, tmp_path / 'mid_longer', resume=True,
                   load_from=str(work / 'iter_7.pth'),
                   **{'train_cfg.max_epochs': 2, 'train_dataloader.dataset.length': 14}).train()
    assert '(training images 12 -> 14): with another training set the samples left in ' \
        'that pass are unknown.' in str(error.value)


def test_another_models_checkpoint_in_resume_is_one_message(tmp_path):
    other = torch.nn.Linear(3, 3)
    path = tmp_path / 'other.pth'
    torch.save(dict(meta=dict(epoch=1, iter=6), state_dict=other.state_dict()), path)
    with pytest.raises(WeightsMismatchError) as error:
        toy_runner(tmp_path, tmp_path / 'work', resume=True, load_from=str(path)).train()
    assert str(error.value).startswith(
        f'{path} does not fit the model of the config: of its 4 weights, 4 missing')


def test_a_failed_save_removes_its_partial_file_and_says_what_space_it_needed(
        tmp_path, monkeypatch):
    """The disk fills up while epoch_2.pth is written: one message with the space needed
    and free, no partial file, last_checkpoint still names epoch_1.pth, and --resume
    (with space again) saves epoch_2.pth."""
    from mmengine.fileio.backends.local_backend import LocalBackend
    put = LocalBackend.put

    def fills_up(self, obj, filepath):
        if 'epoch_2' in str(filepath):
            with open(filepath, 'wb') as f:
                f.write(obj[:len(obj) // 2])
            raise OSError(28, 'No space left on device')
        put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, 'put', fills_up)
    work = tmp_path / 'work'
    with pytest.raises(CheckpointSaveError) as error:
        toy_runner(tmp_path, work).train()
    message = str(error.value)
    assert message.startswith(f'Saving the checkpoint {work}/epoch_2.pth failed: No space '
                              'left on device. It needs about 0.4 kB; ')
    assert re.search(r'; \S+ has [0-9.]+ [kMG]B free\. The partial file was removed', message)
    assert sorted(p.name for p in work.glob('*.pth*')) == ['epoch_1.pth']
    assert not list(work.glob('.*.partial'))
    assert (work / 'last_checkpoint').read_text().endswith('epoch_1.pth')

    monkeypatch.undo()
    toy_runner(tmp_path, work, resume=True).train()
    assert torch.load(work / 'epoch_3.pth')['meta']['epoch'] == 3


def test_a_live_run_holds_the_work_dir_and_a_killed_one_does_not(tmp_path):
    """A second training in a held work dir stops with one message and writes nothing
    there (no checkpoint, no copy of its config over the live run's); once the holder is
    killed, its lock file blocks nothing."""
    work = tmp_path / 'work'
    holder = subprocess.Popen(
        [sys.executable, '-c',
         'import sys, time\n'
         'from mmconvmlp.engine.work_dir_lock import hold_work_dir\n'
         'with hold_work_dir(sys.argv[1]):\n'
         '    print("held", flush=True)\n'
         '    time.sleep(600)\n', str(work)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        with pytest.raises(WorkDirBusyError) as error:
            toy_runner(tmp_path, work).train()
        assert str(error.value).startswith(
            f'The work dir {work} is in use by another training (process {holder.pid} on ')
        assert not list(work.glob('*.pth')) and not list(work.glob('*.py'))  # no config copy
    finally:
        holder.kill()
        holder.wait()
    toy_runner(tmp_path, work).train()  # the lock file is still there, held by no one
    assert (work / '.training.lock').exists() and (work / 'epoch_3.pth').exists()
    assert (work / 'toy.py').exists()


@pytest.mark.parametrize('step,last,left_out', [
    (20, 60, True), (25, 60, False), (60, 60, True), (61, 61, True), (5, 60, False)])
def test_the_line_names_the_validation_a_stop_leaves_out(step, last, left_out):
    """Validation every 10 steps from step 10, and after the last: a stop after a step that
    validates says the resume leaves that validation out; no validation loop, no words."""
    runner = SimpleNamespace(train_loop=SimpleNamespace(val_begin=10, val_interval=10),
                             val_loop=object())
    words = PreemptionHook._validation_left_out(runner, step, last, 'iteration')
    assert words == (f'; the validation after iteration {step} is left out' if left_out
                     else '')
    runner.val_loop = None
    assert PreemptionHook._validation_left_out(runner, step, last, 'iteration') == ''


def test_handlers_are_installed_while_training_only(tmp_path):
    """Importing mmconvmlp installs no handler (in a fresh process); training puts the
    previous handlers back, after a preemption too."""
    script = ('import signal\n'
              'before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]\n'
              'import mmconvmlp, mmconvmlp.engine\n'
              'assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] '
              '== before\n')
    subprocess.run([sys.executable, '-c', script], env=ENV, check=True, timeout=120)

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        toy_runner(tmp_path, tmp_path / 'whole').train()
        assert signal.getsignal(signal.SIGUSR1) is mine
        runner = toy_runner(tmp_path, tmp_path / 'preempted',
                            custom_hooks=[dict(type='SignalAfterIteration', iteration=2)])
        with pytest.raises(SystemExit) as exit_info:
            runner.train()
        assert exit_info.value.code == PREEMPTED_EXIT_CODE
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


WORKER_SCRIPT = '''
import os, sys, time
import toy_training
from mmconvmlp.engine import ConvMLPRunner

class Pids(toy_training.NoisyToyDataset):
    def __getitem__(self, index):
        return dict(pid=os.getpid())

loader = ConvMLPRunner.build_dataloader(dict(
    dataset=Pids(), batch_size=1, num_workers=1, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate')), seed=0)
batches = iter(loader)
print(int(next(batches)['pid'][0]), flush=True)
sys.stdin.readline()  # the test signals the worker meanwhile
print(int(next(batches)['pid'][0]), flush=True)
time.sleep(600)
'''


def _gone(pid) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(')')[1].split()[0] == 'Z'
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG')
def test_workers_ignore_others_signals_and_die_with_their_process():
    """A worker outlives SIGTERM and SIGUSR1 from another process (Slurm signals every
    process of the job) and goes on loading; it ends within seconds of its main process's
    kill -9."""
    main = subprocess.Popen([sys.executable, '-c', WORKER_SCRIPT], env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        worker = int(main.stdout.readline())
        assert worker != main.pid
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGUSR1)
        time.sleep(0.5)
        assert not _gone(worker)
        main.stdin.write('\n')
        main.stdin.flush()
        assert int(main.stdout.readline()) == worker
        main.kill()
        main.wait()
        deadline = time.monotonic() + 20
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker)
    finally:
        main.kill()


def test_the_demo_configs_save_every_epoch_and_set_a_seed():
    """A preempted demo loses at most an epoch (FPN: 250 iterations) and repeats."""
    for name, interval in (('detection/retinanet_convmlp_s_shapes.py', 1),
                           ('detection/mask_rcnn_convmlp_s_shapes.py', 1),
                           ('segmentation/fpn_convmlp_s_shapes.py', 250)):
        cfg = Config.fromfile(osp.join(ROOT, 'configs', name))
        assert cfg.default_hooks.checkpoint.interval == interval, name
        assert cfg.randomness.seed == 0, name
