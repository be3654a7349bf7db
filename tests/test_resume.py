"""Resumes that end where the uninterrupted run ends: a run killed with SIGKILL between two
checkpoints and resumed ends with the very weights of a run never interrupted, for the
epoch-based RetinaNet and the iteration-based Semantic FPN shapes demos (random flips,
stochastic depth, a persistent data-loader worker, validation between checkpoints), through
tools/train.py and MMDetection's own train.py; a late resume of an iteration-based run
loads no batch it already trained."""
import functools
import itertools
import os
import os.path as osp
import subprocess

import pytest
import torch
from mmengine.dataset import InfiniteSampler
from torch.utils.data import Dataset

from mmconvmlp.datasets import write_shapes_dataset
from mmconvmlp.engine import ConvMLPRunner
from test_engine import ToyModel
from test_tools import ROOT, run, tool, wheel_tool

RETINANET = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_shapes.py')
SEM_FPN = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_shapes.py')
TESTS = osp.dirname(osp.abspath(__file__))


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('resume')
    write_shapes_dataset(str(root / 'data' / 'shapes'), num_train=4, num_val=2,
                         image_size=64, seed=0)
    return root


def options(config, *extra):
    """Two images a step, float32 (the bfloat16 choice rests on a timing), 64x64 images,
    seed 0, a checkpoint every 3 iterations, validation at every epoch (RetinaNet: two
    iterations each) or after the checkpoint of iteration 3 (FPN)."""
    common = ['train_dataloader.batch_size=2', 'optim_wrapper.precision=float32',
              'randomness.seed=0', 'default_hooks.checkpoint.by_epoch=False',
              'default_hooks.checkpoint.interval=3', 'default_hooks.logger.interval=1',
              'val_dataloader.batch_size=2']
    if config == RETINANET:
        common += ['train_cfg.max_epochs=3', 'train_cfg.val_interval=1',
                   'train_dataloader.dataset.pipeline.2.scale=(64,64)',
                   'val_dataloader.dataset.pipeline.1.scale=(64,64)',
                   'param_scheduler.0.end=4']
    else:
        common += ['train_cfg.max_iters=6',
                   'train_cfg.val_interval=3', 'model.data_preprocessor.size=(64,64)',
                   'param_scheduler.0.end=2', 'param_scheduler.1.begin=2',
                   'param_scheduler.1.end=6']
    return ['--cfg-options', *common, *extra]


def killed_after(config, iteration, folder):
    """A config that is ``config`` plus a hook killing the run after ``iteration``."""
    path = folder / f'killed_{osp.basename(config)}'
    path.write_text(f'_base_ = {config!r}\n'
                    "custom_imports = dict(imports=['mmconvmlp', 'mmconvmlp.engine', "
                    "'toy_training'], allow_failed_imports=False)\n"
                    f"custom_hooks = [dict(type='SignalAfterIteration', "
                    f"iteration={iteration}, signal_name='SIGKILL')]\n")
    return path


def final_weights(work_dir):
    return torch.load(osp.join(work_dir, 'iter_6.pth'), map_location='cpu')['state_dict']


@pytest.mark.parametrize('config,resume_tool', [
    (RETINANET, functools.partial(wheel_tool, 'mmdet')), (SEM_FPN, tool)],
    ids=['retinanet_by_epoch_resumed_by_mmdet', 'sem_fpn_by_iteration'])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(data_root, config, resume_tool):
    """Killed after iteration 5, resumed from the checkpoint of iteration 3 (RetinaNet: one
    batch into its second epoch; FPN: validated after it): both runs end with equal
    weights, tensor for tensor."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get('PYTHONPATH', '')]),
               PYTHONWARNINGS='ignore')
    name = osp.splitext(osp.basename(config))[0]
    whole, broken = data_root / f'{name}_whole', data_root / f'{name}_killed'
    processes = [
        subprocess.Popen(tool('train.py', config, '--work-dir', whole, *options(config)),
                         cwd=data_root, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True),
        subprocess.Popen(tool('train.py', killed_after(config, 5, data_root), '--work-dir',
                              broken, *options(config)),
                         cwd=data_root, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)]
    errors = [p.communicate(timeout=400)[1] for p in processes]
    assert processes[0].returncode == 0, errors[0][-4000:]
    assert processes[1].returncode == -9, errors[1][-4000:]
    assert (broken / 'iter_3.pth').is_file() and not (broken / 'iter_6.pth').exists()

    run(resume_tool('train.py', config, '--work-dir', broken, '--resume', *options(config)),
        data_root, env)
    log = open(sorted(broken.glob('*/*.log'))[-1]).read()
    assert 'resumed epoch: 1, iter: 3' in log if config == RETINANET else 'iter: 3' in log
    expected, resumed = final_weights(whole), final_weights(broken)
    assert expected.keys() == resumed.keys()
    differing = [key for key in expected if not torch.equal(expected[key], resumed[key])]
    assert not differing, f'{len(differing)} of {len(expected)} tensors differ'


class CountingDataset(Dataset):
    """Five samples; remembers which it was asked for (in the class: mmengine builds the
    loader from a deep copy)."""

    reads = []

    def __len__(self):
        return 5

    def __getitem__(self, index):
        self.reads.append(int(index))
        return dict(inputs=torch.full((2,), float(index)))


def counting_runner(work_dir, name, dataset, max_iters, resume_from=None):
    return ConvMLPRunner(
        model=ToyModel(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=dict(dataset=dataset, batch_size=2, num_workers=0,
                              sampler=dict(type='InfiniteSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False,
                                           interval=1)),
        randomness=dict(seed=0), load_from=resume_from, resume=resume_from is not None)


def test_a_late_resume_loads_only_the_batches_it_trains(tmp_path):
    """A checkpoint whose counter and sample position say 5000 iterations (batches of 2):
    the resumed run reads the 4 samples of its two iterations, the ones at positions
    10000-10003 of the sampler's stream (mmengine 0.10.7 alone reads the 10000 before them
    first)."""
    dataset = CountingDataset()
    counting_runner(tmp_path, 'late_first', dataset, max_iters=1).train()
    assert len(dataset.reads) == 2
    checkpoint = torch.load(tmp_path / 'iter_1.pth')
    checkpoint['meta']['iter'] = 5000
    checkpoint['resume_state']['position']['samples'] = 5000 * 2
    torch.save(checkpoint, tmp_path / 'iter_5000.pth')

    dataset.reads.clear()
    counting_runner(tmp_path, 'late_resumed', dataset, max_iters=5002,
                    resume_from=str(tmp_path / 'iter_5000.pth')).train()
    stream = InfiniteSampler(dataset, shuffle=True, seed=0)
    assert dataset.reads == list(itertools.islice(iter(stream), 10000, 10004))
    assert torch.load(tmp_path / 'iter_5002.pth')['meta']['iter'] == 5002


class FakeCuda:
    """What torch.cuda answers in a process that sees ``count`` GPUs and uses ``current``:
    a generator state per GPU, and an IndexError for a GPU index past the visible ones (as
    torch's ``default_generators[index]``)."""

    def __init__(self, count, current):
        self.states = [torch.full((4,), i, dtype=torch.uint8) for i in range(count)]
        self.current = current

    def _index(self, device):
        return self.current if device == 'cuda' else torch.device('cuda', device).index

    def get_rng_state(self, device='cuda'):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, new_state, device='cuda'):
        self.states[self._index(device)][:] = new_state

    def get_rng_state_all(self):
        return [state.clone() for state in self.states]

    def set_rng_state_all(self, new_states):
        for device, state in enumerate(new_states):
            self.set_rng_state(state, device)

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, 'current_device', lambda: self.current)
        for name in ('get_rng_state', 'set_rng_state', 'get_rng_state_all',
                     'set_rng_state_all'):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


@pytest.mark.parametrize('count,current', [(4, 3), (1, 0)], ids=['4_gpus', '1_gpu_per_task'])
def test_cuda_states_resume_with_fewer_visible_gpus(monkeypatch, count, current):
    """A process that used GPU 5 of 8 stores that GPU's generator only; a process that sees
    4 GPUs and uses GPU 3, or one GPU (Slurm binding one per task), gets it back on the GPU it
    uses, and the other GPUs' generators stay as they were."""
    from mmconvmlp.engine.resume_state import generator_states, set_generator_states
    eight = FakeCuda(8, current=5)
    eight.install(monkeypatch)
    saved = generator_states()['cuda']
    assert saved['device'] == 5 and torch.equal(saved['state'], eight.states[5])

    fewer = FakeCuda(count, current)
    fewer.install(monkeypatch)
    before = fewer.get_rng_state_all()
    set_generator_states(dict(generator_states(), cuda=saved))
    after = fewer.get_rng_state_all()
    assert torch.equal(after[current], eight.states[5])
    assert all(torch.equal(after[i], before[i]) for i in range(count) if i != current)
