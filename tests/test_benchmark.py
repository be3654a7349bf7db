"""tools/analysis/benchmark.py: one row per config with its figures (tiny images, few
repeats: what is checked is the table, not the speed), precision choice and one-line
errors."""
import importlib.util
import os.path as osp
import re

import pytest
import torch

from mmconvmlp.machine import cpu_model, describe_device

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    'benchmark', osp.join(ROOT, 'tools/analysis/benchmark.py'))
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

CONVMLP_SEGMENTOR = osp.join(ROOT, 'configs/segmentation/fpn_convmlp_s_ade20k.py')
CONVMLP_DETECTOR = osp.join(ROOT, 'configs/detection/retinanet_convmlp_s_coco.py')
STOCK_DETECTOR = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'


def test_a_row_per_config_with_its_figures(capsys):
    benchmark.main([CONVMLP_SEGMENTOR, STOCK_DETECTOR, '--shape', '64', '64', '--batch', '2',
                    '--repeats', '2'])
    out = capsys.readouterr().out
    header = out.split('| config')[0]
    assert ('on 2x3x64x64 synthetic images, random weights (no checkpoint loaded or '
            'downloaded); median of 2 runs') in header
    assert f'device: cpu, {cpu_model()}; instruction set ' in header
    assert f'; {torch.get_num_threads()} threads; torch {torch.__version__}' in header
    assert 'precision: float32' in header
    rows = [line.strip('|').split('|') for line in out.splitlines()
            if line.startswith('| ') and not line.startswith('| config')]
    assert [cells[0].strip() for cells in rows] == [
        'fpn_convmlp_s_ade20k.py', 'retinanet_r50_fpn_1x_coco.py']
    for _, img_per_s, latency, memory in rows:
        median, low, high = map(float, re.fullmatch(r' (\d+) \((\d+)-(\d+)\) ', latency).groups())
        assert 0 < low <= median <= high
        assert float(img_per_s) == pytest.approx(2000 / median, rel=0.01, abs=0.01)
        assert float(memory) > 100  # the process's peak RSS, torch and the model included



def test_compile_compiles_each_backbone_and_reports_the_first_run(monkeypatch, capsys):
    compiled = []

    def compile_(fn, **kwargs):  # records what would be compiled, runs it as it is
        compiled.append(fn.__qualname__)
        return fn
    monkeypatch.setattr(torch, 'compile', compile_)
    benchmark.main([CONVMLP_SEGMENTOR, STOCK_DETECTOR, '--shape', '64', '64', '--repeats', '1',
                    '--compile'])
    out = capsys.readouterr().out
    assert compiled == ['all_taps', 'ResNet.forward']  # ConvMLP's compile=True, the helper
    assert 'backbone compiled (torch.compile' in out
    rows = [line.strip('|').split('|') for line in out.splitlines() if line.startswith('| ')]
    assert rows[0][-1].strip() == 'first run s'
    assert all(float(cells[-1]) >= 0 for cells in rows[1:]) and len(rows) == 3

def test_the_header_names_instruction_set_limits(monkeypatch):
    monkeypatch.delenv('ATEN_CPU_CAPABILITY', raising=False)
    monkeypatch.delenv('MKL_ENABLE_INSTRUCTIONS', raising=False)
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
    line = describe_device(torch.device('cpu'))
    assert f'instruction set {torch.backends.cpu.get_cpu_capability()} ' \
           f'(ONEDNN_MAX_CPU_ISA=AVX2); bfloat16 ' in line
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA')
    assert '(ONEDNN' not in describe_device(torch.device('cpu'))


def test_peak_memory_is_that_since_the_reset():
    memory = benchmark.PeakMemory(torch.device('cpu'))
    if memory.kind != 'peak RSS':
        pytest.skip('this system cannot reset the peak resident set size')
    block = torch.ones(300 << 20, dtype=torch.uint8)  # 300 MB, touched
    with_block = memory.peak_mb()
    del block
    memory.reset()
    after_reset = memory.peak_mb()
    assert after_reset < with_block - 250
    block = torch.ones(200 << 20, dtype=torch.uint8)
    assert memory.peak_mb() >= after_reset + 190
    del block


@pytest.mark.parametrize('ratio, dtype, words', [
    (0.5, torch.bfloat16, 'bfloat16 autocast in backbone and neck, float32 heads (--amp; a '
                          'bfloat16 probe ran 2.0x as fast'),
    (40., None, 'float32: --amp asked for bfloat16, but a bfloat16 probe ran 40x slower'),
])
def test_amp_on_the_cpu_follows_the_bfloat16_probe(monkeypatch, ratio, dtype, words):
    import mmconvmlp.engine.precision as precision
    monkeypatch.setattr(precision, 'cpu_bfloat16_speed', lambda: ratio)
    chosen, text = benchmark.choose_precision(torch.device('cpu'), amp=True)
    assert chosen == dtype and text.startswith(words)
    assert benchmark.choose_precision(torch.device('cpu'), amp=False) == (None, 'float32')
    assert benchmark.choose_precision(torch.device('cuda'), amp=True)[0] == torch.float16


def test_features_in_bfloat16_reach_the_heads_in_float32():
    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.neck = torch.nn.Linear(4, 4)

        def extract_feat(self, inputs):
            return [self.neck(inputs), self.neck(inputs) * 2]

    model = Detector()
    benchmark.autocast_features(model, torch.bfloat16)
    features = model.extract_feat(torch.randn(3, 4))
    assert [f.dtype for f in features] == [torch.float32, torch.float32]
    with torch.no_grad():
        plain = model.neck(torch.ones(1, 4))
    assert not torch.equal(model.extract_feat(torch.ones(1, 4))[0], plain)  # bfloat16 rounding


def test_bfloat16_autocast_runs_a_whole_detector(monkeypatch, capsys):
    """mmcv's NMS has no bfloat16 CPU kernel: only backbone and neck run in bfloat16."""
    import mmconvmlp.engine.precision as precision
    monkeypatch.setattr(precision, 'cpu_bfloat16_speed', lambda: 0.5)
    benchmark.main([CONVMLP_DETECTOR, '--shape', '64', '64', '--repeats', '1', '--amp'])
    out = capsys.readouterr().out
    assert 'precision: bfloat16 autocast' in out
    assert re.search(r'^\| retinanet_convmlp_s_coco.py \| [\d.]+ \| \d+ ', out, re.MULTILINE)


def not_a_detector(tmp_path):
    path = tmp_path / 'classifier.py'
    path.write_text("default_scope = 'mmdet'\nmodel = dict(type='ResNet', depth=18)\n")
    return str(path)


@pytest.mark.parametrize('args, message', [
    (lambda tmp: [not_a_detector(tmp)],
     "classifier.py: its model 'ResNet' is not an mmdet BaseDetector; give a detector or "
     "segmentor config."),
    (lambda tmp: [CONVMLP_SEGMENTOR, '--shape', '16', '64'],
     '--shape 16 64: height and width must be at least 32 pixels.'),
    (lambda tmp: [str(tmp / 'missing.py')], 'missing.py: no such config file'),
    (lambda tmp: ['nopackage::retinanet/x.py'],
     "nopackage::retinanet/x.py: no installed package 'nopackage'"),
    (lambda tmp: [CONVMLP_SEGMENTOR, '--device', 'cuda'],
     '--device cuda: CUDA is not available here; use --device cpu.'),
    (lambda tmp: [CONVMLP_SEGMENTOR, '--repeats', '0'], 'both must be at least 1.'),
])
def test_bad_input_gets_one_line(monkeypatch, tmp_path, capsys, args, message):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(args(tmp_path))
    text = str(exit_.value.code)
    assert text.startswith('benchmark.py: error: ') and message in text and '\n' not in text
    assert '| config' not in capsys.readouterr().out  # nothing was timed
