"""tools/benchmark_backbone.py: the table's rows and columns (a run on tiny inputs; the
timings themselves are not checked), the practical peak and the counted work."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import torch

from mmconvmlp.models import ConvMLP

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(ROOT, 'tools', 'benchmark_backbone.py')


def load_benchmark():
    spec = importlib.util.spec_from_file_location('benchmark_backbone', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_has_a_row_per_model_and_case_with_the_fraction_of_peak():
    result = subprocess.run(
        [sys.executable, SCRIPT, '--infer-input', '1x3x70x90', '--train-input', '2x3x64x64',
         '--repeats', '4', '--bounds', '--norm-eval'],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    header, _, table = result.stdout.partition('\n\n')
    assert 'practical peak' in header and 'mm 2048^3' in header
    assert 'conv3x3 256ch 80x80' in header
    rows = [[cell.strip() for cell in line.split('|')[1:-1]]
            for line in table.splitlines()[2:] if line.startswith('| ')]
    models = ["authors' layout", 'mmconvmlp plain', 'mmconvmlp']
    assert [row[2] for row in rows] == models * 3 + [
        "authors' layout", 'bound: no BatchNorm', 'bound: no BN/ReLU/LN/GELU']
    assert [row[0] for row in rows if row[0]] == [
        'inference', 'train step', 'with norm_eval', 'train step bounds']
    for row in rows:
        assert float(row[3]) > 0 and float(row[4]) > 0 and row[5].endswith('%')
    # the goals of float32: 90% of the peak in inference, 85% in a training step; met or not
    # as the fraction says (none for the bounds, which are no models)
    for row, goal in zip(rows, [90] * 3 + [85] * 6 + [None] * 3):
        met = 'met' if int(row[5][:-1]) >= (goal or 0) else 'below'
        assert row[6] == (f'{goal}%: {met}' if goal else '-')
    assert all(float(row[8]) < 1e-5 for row in rows[1:3])  # inference: the outputs agree


def test_backbone_work_is_twice_the_counted_macs():
    benchmark = load_benchmark()
    x = torch.randn(1, 3, 224, 224)
    flop = benchmark.backbone_flop(ConvMLP(arch='s').eval(), x)
    assert round(flop / 2e9, 1) == 2.4  # the paper's 2.4 GMACs (its classifier adds 0.5M)


def test_practical_peak_is_the_best_dense_kernel():
    benchmark = load_benchmark()
    peak, rates = benchmark.practical_peak(torch.float32, torch.device('cpu'), 1,
                                           benchmark.time.perf_counter)
    assert set(rates) == {'mm 2048^3', 'conv3x3 256ch 80x80'}
    assert peak == max(rates.values()) > 0
