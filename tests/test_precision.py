"""Mixed precision chosen by what the machine runs fast (mmconvmlp.engine.precision).

The probe is replaced by a fixed ratio to simulate a CPU with bfloat16 units (ratio < 1) and
one that emulates bfloat16 (ratio >> 1), so both choices are tested on any machine; one test
runs the real probe with the CPU held to AVX2, where bfloat16 is always emulated."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from mmconvmlp.engine import precision
from mmconvmlp.engine.precision import (BF16AutocastOptimWrapper, choose_cpu_precision,
                                        use_amp)
from mmconvmlp.machine import AVX2_ONLY

NATIVE, EMULATED = 0.55, 180.


@pytest.fixture
def cpu_with(monkeypatch):
    """Simulate a CPU whose bfloat16 probe gives the ratio passed; collect the log lines."""
    logged = []
    monkeypatch.setattr(precision, 'print_log', lambda msg, **kw: logged.append(msg))

    def simulate(ratio):
        monkeypatch.setattr(precision, 'cpu_bfloat16_speed', lambda: ratio)
        return logged
    return simulate


def build(precision_name='auto', **kwargs):
    model = torch.nn.Linear(4, 2)
    wrapper = OPTIM_WRAPPERS.build(dict(
        type='MixedPrecisionOptimWrapper', precision=precision_name, **kwargs,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3)))
    return model, wrapper


def forward_dtype(model, wrapper):
    with wrapper.optim_context(model):
        return model(torch.randn(3, 4)).dtype


def test_auto_takes_bfloat16_where_the_cpu_runs_it_fast(cpu_with):
    logged = cpu_with(NATIVE)
    model, wrapper = build()
    assert type(wrapper) is BF16AutocastOptimWrapper
    assert forward_dtype(model, wrapper) == torch.bfloat16
    assert model(torch.randn(3, 4)).dtype == torch.float32  # outside the training step
    assert len(logged) == 1 and 'bfloat16 autocast' in logged[0] and '1.8x as fast' in logged[0]


def test_auto_takes_float32_where_bfloat16_is_emulated(cpu_with):
    logged = cpu_with(EMULATED)
    model, wrapper = build(clip_grad=dict(max_norm=10))
    assert type(wrapper) is OptimWrapper
    assert forward_dtype(model, wrapper) == torch.float32
    assert wrapper.clip_grad_kwargs == dict(max_norm=10)  # the other options still arrive
    assert len(logged) == 1 and 'float32' in logged[0] and '180x slower' in logged[0]


def test_forcing_bfloat16_on_an_emulating_cpu_warns_how_much_slower(cpu_with):
    cpu_with(EMULATED)
    with pytest.warns(UserWarning, match=r'no fast bfloat16: .*180x slower.*precision=auto'):
        model, wrapper = build('bfloat16')
    assert forward_dtype(model, wrapper) == torch.bfloat16
    cpu_with(NATIVE)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model, wrapper = build('bfloat16')
    assert type(wrapper) is BF16AutocastOptimWrapper


def test_forcing_float32_needs_no_probe(cpu_with, monkeypatch):
    logged = cpu_with(NATIVE)

    def no_probe():
        raise AssertionError('the probe ran')
    monkeypatch.setattr(precision, 'cpu_bfloat16_speed', no_probe)
    model, wrapper = build('float32')
    assert type(wrapper) is OptimWrapper and forward_dtype(model, wrapper) == torch.float32
    assert 'precision=float32' in logged[0]


def test_bad_precision_names_the_valid_ones(cpu_with):
    cpu_with(NATIVE)
    with pytest.raises(ValueError, match=r"precision='half' is not one of .*'bfloat16'"):
        build('half')
    with pytest.raises(ValueError, match='float16 needs a GPU'):
        build('float16')


def simulate_gpu(monkeypatch, capability):
    """A GPU of this compute capability, as torch reports it: ``is_bf16_supported()``
    counts emulation by default, so it says yes on a T4 (sm_75) too; only
    ``including_emulation=False`` asks for bfloat16 units (Ampere, 8.0, and newer)."""
    monkeypatch.setattr('mmengine.optim.optimizer.amp_optimizer_wrapper.is_cuda_available',
                        lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                        lambda including_emulation=True: capability >= (8, 0)
                        or including_emulation)


@pytest.mark.parametrize('capability, asked, dtype', [
    ((9, 0), 'auto', torch.bfloat16), ((8, 0), 'auto', torch.bfloat16),
    ((7, 5), 'auto', torch.float16), ((9, 0), 'float16', torch.float16),
    ((8, 6), 'bfloat16', torch.bfloat16)])
def test_cuda_takes_bfloat16_only_where_the_gpu_has_it(monkeypatch, capability, asked, dtype):
    """Simulated GPUs: AmpOptimWrapper asks whether CUDA exists, the choice what the GPU's
    compute capability is (a T4 emulates bfloat16: float16 AMP is the fast one there)."""
    simulate_gpu(monkeypatch, capability)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # GradScaler without a GPU disables itself
        wrapper, reason = precision._cuda_wrapper(optimizer, asked, {})
    assert type(wrapper) is AmpOptimWrapper and wrapper.cast_dtype == dtype
    assert reason.startswith('float16 AMP') == (dtype == torch.float16)
    if capability < (8, 0):
        assert 'has no bfloat16' in reason
        with pytest.raises(ValueError, match='does not support bfloat16.*8.0'):
            precision._cuda_wrapper(optimizer, 'bfloat16', {})


def test_amp_flag_picks_the_wrapper_for_the_device(monkeypatch):
    def config(wrapper_type):
        return Config(dict(optim_wrapper=dict(type=wrapper_type,
                                              optimizer=dict(type='AdamW', lr=1e-4))))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = config('OptimWrapper')
    use_amp(cfg)
    assert cfg.optim_wrapper.type == 'MixedPrecisionOptimWrapper'
    assert cfg.optim_wrapper.precision == 'auto'

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = config('MixedPrecisionOptimWrapper')
    use_amp(cfg)  # on CUDA --amp is float16 AMP, as mmdet's own --amp
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic' and 'precision' not in cfg.optim_wrapper
    with pytest.raises(SystemExit, match="'ZeroRedundancyOptimizer'.*OptimWrapper"):
        use_amp(config('ZeroRedundancyOptimizer'))


@pytest.mark.parametrize('name', ['detection/retinanet_convmlp_s_shapes.py',
                                  'segmentation/fpn_convmlp_s_shapes.py'])
def test_demo_configs_choose_by_capability(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = Config.fromfile(os.path.join(root, 'configs', name))
    assert cfg.optim_wrapper.type == 'MixedPrecisionOptimWrapper'
    assert cfg.optim_wrapper.get('precision', 'auto') == 'auto'


def test_the_probe_finds_bfloat16_emulated_on_an_avx2_cpu():
    """The real probe, with PyTorch's kernels, oneDNN and MKL held to AVX2 (no bfloat16
    instructions): bfloat16 is emulated there, whatever CPU runs the test."""
    code = ('from mmconvmlp.engine.precision import cpu_bfloat16_speed, choose_cpu_precision;'
            'print(cpu_bfloat16_speed()); print(choose_cpu_precision()[0])')
    out = subprocess.run([sys.executable, '-c', code], env={**os.environ, **AVX2_ONLY},
                         capture_output=True, text=True, timeout=300, check=True).stdout
    ratio, dtype = out.split()
    assert float(ratio) > 2 and dtype == 'torch.float32'
