"""mmconvmlp.engine in this process and in a bare one: safe loading of mmengine checkpoints
on every loading path, refused and unreadable files, the backbone from a detector's
checkpoint, ConvMLPRunner's checkpoints on a toy model, launcher and option errors. The
runner with the configs and the tools end to end is in test_tools.py."""
import glob
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.model import BaseModel
from mmengine.runner import load_checkpoint
from torch.utils.data import DataLoader, TensorDataset

from mmconvmlp.engine import (CheckpointRefusedError, CheckpointUnreadableError,
                              ConvMLPRunner, install_excepthook)
from mmconvmlp.engine.command_line import make_parser
from mmconvmlp.engine.cpu_processes import LAUNCHER_VARIABLES, LauncherError
from mmconvmlp.models import ConvMLP

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_coco.py')
SEM_FPN = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_ade20k.py')


def mmengine_checkpoint(state_dict) -> dict:
    """What mmengine 0.10.7's Runner.save_checkpoint writes: weights, meta and the message
    hub, whose HistoryBuffers and numpy numbers torch's safe loading refuses by itself."""
    hub = MessageHub('test_engine')
    for loss in (0.5, 0.25):
        hub.update_scalar('train/loss', np.float64(loss))
    hub.update_info('iter', np.int64(2))
    return dict(meta=dict(epoch=1, iter=2, seed=np.int64(0)), state_dict=state_dict,
                message_hub=hub.state_dict())


class CreatesFile:
    """Pickles as a call of ``open(path, 'w')``: loading it unsafely creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


class ReachesInit:
    """Pickles as ``getattr(HistoryBuffer, '__init__')``, past the methods safe loading may
    look up on a HistoryBuffer."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


def test_mmengine_checkpoints_load_safely_once_mmconvmlp_is_imported(tmp_path):
    """In a fresh process torch's default (safe) loading refuses the file; after
    ``import mmconvmlp`` the very same call loads it."""
    path = tmp_path / 'epoch_1.pth'
    torch.save(mmengine_checkpoint({'w': torch.ones(2)}), path)
    script = (
        'import pickle, sys, torch\n'
        'try:\n'
        '    torch.load(sys.argv[1])\n'
        '    sys.exit("loaded before import mmconvmlp")\n'
        'except pickle.UnpicklingError:\n'
        '    pass\n'
        'import mmconvmlp\n'
        'ckpt = torch.load(sys.argv[1])\n'
        'print(ckpt["message_hub"]["log_scalars"]["train/loss"].mean())\n')
    result = subprocess.run([sys.executable, '-c', script, str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == '0.375'


def test_getattr_reaches_history_buffer_methods_only(tmp_path):
    torch.save({'bad': ReachesInit()}, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointRefusedError) as error:
        load_checkpoint(torch.nn.Linear(1, 1), str(tmp_path / 'bad.pth'))
    assert "would run code (it asks to import and call builtins.getattr(HistoryBuffer," \
           "'__init__'))" in str(error.value)


def refused(load, marker):
    """Run ``load`` and check it was refused as code, with nothing created."""
    with pytest.raises(CheckpointRefusedError) as error:
        load()
    message = str(error.value)
    assert 'was refused: loading it would run code (it asks to import and call' in message
    assert 'weights_only' not in message
    assert not marker.exists()
    return message


def test_a_file_that_would_create_a_file_is_refused_on_every_path(tmp_path):
    """mmengine's load_checkpoint, the Runner's load_from / resume (what train.py --resume
    and test.py call), init_cfg Pretrained, DetInferencer and MMSegInferencer."""
    from mmdet.apis import DetInferencer
    from mmengine.runner import Runner
    from mmseg.apis import MMSegInferencer

    marker = tmp_path / 'created'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': CreatesFile(marker)}, evil)
    assert 'io.open' in torch.serialization.get_unsafe_globals_in_checkpoint(str(evil))

    message = refused(lambda: load_checkpoint(torch.nn.Linear(1, 1), str(evil)), marker)
    assert message.startswith(f'{evil} was refused') and 'io.open' in message
    runner = Runner(model=torch.nn.Linear(1, 1), work_dir=str(tmp_path / 'work'))
    refused(lambda: runner.load_checkpoint(str(evil)), marker)
    refused(lambda: runner.resume(str(evil)), marker)
    backbone = ConvMLP('s', init_cfg=dict(type='Pretrained', checkpoint=str(evil),
                                          prefix='backbone.'))
    refused(backbone.init_weights, marker)
    refused(lambda: DetInferencer(RETINANET, weights=str(evil), device='cpu'), marker)
    refused(lambda: MMSegInferencer(SEM_FPN, weights=str(evil), device='cpu'), marker)


@pytest.mark.parametrize('content,reason', [
    (b'', 'the file is empty (0 bytes)'),
    (b'<html>Not found</html>', "the file is not a PyTorch checkpoint (it starts with b'<htm')"),
    ('half', 'the file is truncated'),
], ids=['empty', 'html', 'truncated'])
def test_an_unreadable_checkpoint_is_named_with_what_is_wrong(tmp_path, content, reason):
    path = tmp_path / 'model.pth'
    torch.save(mmengine_checkpoint({'w': torch.ones(1000)}), path)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2] if content == 'half' else content)
    backbone = ConvMLP('s', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    for load in (lambda: load_checkpoint(torch.nn.Linear(1, 1), str(path)),
                 backbone.init_weights):
        with pytest.raises(CheckpointUnreadableError) as error:
            load()
        assert str(error.value).startswith(f'{path} cannot be loaded as a checkpoint: {reason}')


def test_a_sound_file_that_fails_otherwise_keeps_its_own_error(tmp_path):
    """A complete checkpoint that fails for another reason is not called damaged."""
    path = tmp_path / 'model.pth'
    torch.save({'w': torch.ones(2)}, path)

    def refuse_to_map(storage, location):
        raise RuntimeError('no such device here')

    with pytest.raises(RuntimeError) as error:
        load_checkpoint(torch.nn.Linear(1, 1), str(path), map_location=refuse_to_map)
    assert str(error.value) == 'no such device here'
    assert not isinstance(error.value, CheckpointUnreadableError)


def test_init_cfg_loads_the_backbone_of_a_detector_checkpoint(tmp_path):
    """A detector's mmengine checkpoint (message hub included) initialises ConvMLP from
    plain Python with prefix='backbone.'; the other modules' weights are left out."""
    torch.manual_seed(1)
    trained = ConvMLP('s').state_dict()
    weights = {f'backbone.{name}': value for name, value in trained.items()}
    weights['neck.lateral_convs.0.conv.weight'] = torch.ones(256, 64, 1, 1)
    path = tmp_path / 'epoch_12.pth'
    torch.save(mmengine_checkpoint(weights), path)
    torch.manual_seed(2)
    backbone = ConvMLP('s', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                          prefix='backbone.'))
    backbone.init_weights()
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_readable_errors_print_without_a_traceback(capsys, monkeypatch):
    """An uncaught refusal in a script prints its message alone; other errors as usual
    (sys.excepthook, which the tools install, is what Python calls for an uncaught error)."""
    monkeypatch.setattr(sys, 'excepthook', sys.__excepthook__)
    install_excepthook()
    for error in (CheckpointRefusedError('bad.pth was refused'), ValueError('plain')):
        try:
            raise error
        except Exception as caught:
            sys.excepthook(type(caught), caught, caught.__traceback__)
    printed = capsys.readouterr().err
    refused, plain = printed.split('CheckpointRefusedError: bad.pth was refused\n')
    assert refused == ''
    assert plain.startswith('Traceback') and plain.rstrip().endswith('ValueError: plain')


class ToyModel(BaseModel):
    """One linear layer: enough for the runner to train, save and resume."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.linear(inputs)
        return {'loss': out.pow(2).mean()} if mode == 'loss' else out


def toy_runner(work_dir, name, max_epochs, resume=False) -> ConvMLPRunner:
    data = TensorDataset(torch.randn(8, 2))
    return ConvMLPRunner(
        model=ToyModel(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=DataLoader(data, batch_size=4), resume=resume,
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)))


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """The process dies after a checkpoint is written and before it is renamed: the
    previous checkpoint stays the resume point, nothing under the new name exists; the
    resumed run then saves it whole."""
    from mmconvmlp.engine import runner as runner_module

    toy_runner(tmp_path, 'kill_first', max_epochs=1).train()
    first = (tmp_path / 'epoch_1.pth').read_bytes()

    def killed(partial, final):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, 'publish', killed)
    with pytest.raises(KeyboardInterrupt):
        toy_runner(tmp_path, 'kill_second', max_epochs=2, resume=True).train()
    assert not (tmp_path / 'epoch_2.pth').exists()
    assert (tmp_path / 'epoch_1.pth').read_bytes() == first
    assert (tmp_path / 'last_checkpoint').read_text().endswith('epoch_1.pth')

    monkeypatch.undo()
    toy_runner(tmp_path, 'kill_third', max_epochs=2, resume=True).train()
    assert torch.load(tmp_path / 'epoch_2.pth')['meta']['epoch'] == 2
    assert (tmp_path / 'last_checkpoint').read_text().endswith('epoch_2.pth')
    assert not list(tmp_path.glob('.*.partial'))


def test_resume_with_nothing_to_resume_from_warns(tmp_path):
    toy_runner(tmp_path, 'nothing_to_resume', max_epochs=1, resume=True).train()
    (log,) = tmp_path.glob('*/*.log')
    text = log.read_text()
    assert f'--resume: the work dir {tmp_path} holds no checkpoint to resume from' in text
    assert 'Auto resumed' not in text
    assert (tmp_path / 'epoch_1.pth').exists()


@pytest.mark.parametrize('launcher,missing', [
    ('pytorch', 'RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; torchrun sets them'),
    ('slurm', 'SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST not set; srun sets them')])
def test_a_launcher_that_set_nothing_is_named(monkeypatch, launcher, missing):
    """With CUDA or without: mmengine alone fails with a KeyError deep inside."""
    for name in LAUNCHER_VARIABLES[launcher][0]:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LauncherError) as error:
        ConvMLPRunner.from_cfg(Config(dict(launcher=launcher, model=dict(), work_dir='.')))
    assert str(error.value).startswith(f'--launcher {launcher}: {missing}')


def test_a_cfg_option_without_equals_is_a_usage_error(capsys):
    parser = make_parser('test', 'test')
    assert parser.parse_args(['c.py', '--cfg-options', 'a.b=1']).cfg_options == {'a.b': 1}
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(['c.py', '--cfg-options', 'a.b=1', 'train_cfg.max_epochs'])
    assert exit_info.value.code == 2
    assert 'error: --cfg-options takes KEY=VALUE pairs; "train_cfg.max_epochs" has no "="' \
        in capsys.readouterr().err


def test_every_config_names_the_runner():
    """So that mmdet's and mmseg's own train.py build ConvMLPRunner for them too."""
    paths = sorted(glob.glob(osp.join(ROOT, 'configs', '*', '*.py')))
    assert len(paths) >= 12
    assert {osp.basename(p): Config.fromfile(p).get('runner_type') for p in paths} == \
        {osp.basename(p): 'ConvMLPRunner' for p in paths}


def test_the_cpu_process_group_ends_before_the_interpreter():
    """The gloo group started for CPU processes is destroyed at exit, before the
    interpreter's teardown, where a gloo thread freeing a collective's tensors aborts the
    process."""
    from test_tools import free_port
    script = ('import atexit\n'
              'import torch.distributed as dist\n'
              "atexit.register(lambda: print('at exit:', dist.is_initialized()))\n"
              'from mmengine.config import Config\n'
              'from mmconvmlp.engine.cpu_processes import setup_cpu_distributed\n'
              "print('set up:', setup_cpu_distributed(Config(), 'pytorch'), "
              'dist.get_backend())\n')
    env = dict(os.environ, PYTHONPATH=ROOT, RANK='0', LOCAL_RANK='0', WORLD_SIZE='1',
               MASTER_ADDR='127.0.0.1', MASTER_PORT=free_port(), CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout == 'set up: True gloo\nat exit: False\n', result.stderr[-2000:]
