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


def table_rows(out):
    """The cells of the table's rows, header row first."""
    return [[cell.strip() for cell in line.strip('|').split('|')]
            for line in out.splitlines() if line.startswith('| ')]


def test_a_row_per_config_with_its_figures(capsys):
    benchmark.main([CONVMLP_SEGMENTOR, STOCK_DETECTOR, '--shape', '64', '64', '--batch', '2',
                    '--repeats', '2', '--precision', 'float32'])
    out = capsys.readouterr().out
    header = out.split('| config')[0]
    assert ('on 2x3x64x64 synthetic images, weights as training starts (init_weights, no '
            'pretrained checkpoint loaded or downloaded); median of 2 runs') in header
    assert f'device: cpu, {cpu_model()}; instruction set ' in header
    assert f'; {torch.get_num_threads()} threads; torch {torch.__version__}' in header
    head, *rows = table_rows(out)
    assert head[:4] + head[5:] == ['config', 'precision', 'img/s',
                                   'latency ms, median (min-max)', 'boxes/img']
    assert head[4].startswith('peak RSS') and head[4].endswith(' MB')
    assert [cells[0] for cells in rows] == [
        'fpn_convmlp_s_ade20k.py', 'retinanet_r50_fpn_1x_coco.py']
    for _, precision, img_per_s, latency, memory, boxes in rows:
        assert precision == 'float32 (--precision float32)'
        median, low, high = map(float, re.fullmatch(r'(\d+) \((\d+)-(\d+)\)', latency).groups())
        assert 0 < low <= median <= high
        # the latency cell is rounded to whole milliseconds, img/s is not
        assert 2000 / (median + 0.5) - 0.01 <= float(img_per_s) <= 2000 / (median - 0.5) + 0.01
        assert float(memory) > 100  # the process's peak RSS, torch and the model included
    assert rows[0][5] == '-' and 0 <= float(rows[1][5]) <= 100


def test_heads_start_from_their_training_initialisation_without_downloads():
    """RetinaNet's classifier bias is the prior training starts from (probability 0.01),
    and the stock config's ImageNet ResNet-50 (torchvision://resnet50) is not fetched."""
    cfg, _ = benchmark.load_model_config(STOCK_DETECTOR)
    model = benchmark.build_model(cfg, torch.device('cpu'))
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    assert torch.allclose(model.bbox_head.retina_cls.bias, prior.expand(720))
    assert not model.training


def test_without_pretrained_drops_only_checkpoints():
    model = dict(type='EncoderDecoder', pretrained='open-mmlab://resnet50_v1c',
                 backbone=dict(type='ResNetV1c', init_cfg=dict(
                     type='Pretrained', checkpoint='torchvision://resnet50')),
                 decode_head=dict(type='FPNHead', init_cfg=[
                     dict(type='Normal', std=0.01),
                     dict(type='Pretrained', checkpoint='head.pth')]))
    assert benchmark.without_pretrained(model) == dict(
        type='EncoderDecoder', backbone=dict(type='ResNetV1c'),
        decode_head=dict(type='FPNHead', init_cfg=[dict(type='Normal', std=0.01)]))


def test_a_checkpoint_gives_its_weights(tmp_path):
    cfg, _ = benchmark.load_model_config(CONVMLP_DETECTOR)
    trained = benchmark.build_model(cfg, torch.device('cpu'))
    with torch.no_grad():
        trained.bbox_head.retina_cls.bias.fill_(-2.)
    torch.save(dict(meta=dict(), state_dict=trained.state_dict()), tmp_path / 'trained.pth')
    cfg, _ = benchmark.load_model_config(CONVMLP_DETECTOR)
    model = benchmark.build_model(cfg, torch.device('cpu'), str(tmp_path / 'trained.pth'))
    assert torch.equal(model.bbox_head.retina_cls.bias, torch.full((720,), -2.))


def test_each_gpu_is_waited_for_by_its_own_synchronize(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: waited.append(device))
    benchmark.device_sync(torch.device('cuda', 1))()
    benchmark.device_sync(torch.device('cpu'))()
    assert waited == [torch.device('cuda', 1)]


def test_compile_compiles_each_backbone_and_reports_the_first_run(monkeypatch, capsys):
    compiled = []

    def compile_(fn, **kwargs):  # records what would be compiled, runs it as it is
        compiled.append(fn.__qualname__)
        return fn
    monkeypatch.setattr(torch, 'compile', compile_)
    benchmark.main([CONVMLP_SEGMENTOR, STOCK_DETECTOR, '--shape', '64', '64', '--repeats', '1',
                    '--compile', '--precision', 'float32'])
    out = capsys.readouterr().out
    assert compiled == ['all_taps', 'ResNet.forward']  # ConvMLP's compile=True, the helper
    assert 'backbone compiled (torch.compile' in out
    rows = table_rows(out)
    assert rows[0][-1] == 'first run s'
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


def test_precisions_in_turn_with_the_speed_up_over_the_first(monkeypatch, capsys):
    """mmcv's NMS has no bfloat16 CPU kernel: the post-processing stays float32."""
    import mmconvmlp.engine.precision as precision
    monkeypatch.setattr(precision, 'cpu_bfloat16_speed', lambda: 0.5)
    benchmark.main([CONVMLP_DETECTOR, '--shape', '64', '64', '--repeats', '2',
                    '--precision', 'float32', 'auto'])
    head, float32, auto = table_rows(capsys.readouterr().out)
    assert head[-1] == 'speed-up, median (min-max)'
    assert float32[1] == 'float32 (--precision float32)' and float32[-1] == '1.00x (1.00-1.00)'
    assert auto[1] == ('bfloat16 (auto: a bfloat16 probe ran 2.0x as fast as float32 on this '
                       'CPU); backbone, neck and heads in bfloat16 autocast, post-processing '
                       'in float32')
    assert re.fullmatch(r'[\d.]+x \([\d.]+-[\d.]+\)', auto[-1])


def other_model(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save(dict(state_dict=dict(weight=torch.zeros(2))), path)
    return str(path)


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
    (lambda tmp: [CONVMLP_SEGMENTOR, '--precision', 'float16'], '--precision float16 needs a GPU'),
    (lambda tmp: [CONVMLP_SEGMENTOR, CONVMLP_DETECTOR, '--checkpoint', CONVMLP_DETECTOR],
     "give one CONFIG, the checkpoint's, not 2."),
    (lambda tmp: [CONVMLP_SEGMENTOR, '--checkpoint', str(tmp / 'none.pth')],
     'none.pth: no such file.'),
])
def test_bad_input_gets_one_line(monkeypatch, tmp_path, capsys, args, message):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(args(tmp_path))
    text = str(exit_.value.code)
    assert text.startswith('benchmark.py: error: ') and message in text and '\n' not in text
    assert '| config' not in capsys.readouterr().out  # nothing was timed


def test_a_checkpoint_of_another_model_fails_its_row_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main([CONVMLP_SEGMENTOR, '--checkpoint', other_model(tmp_path)])
    text = str(exit_.value.code)
    assert text.startswith(f'benchmark.py: error: {tmp_path}/other.pth does not fit the model '
                           f'of the config') and '\n' not in text
    assert '| fpn_convmlp_s_ade20k.py | failed, see below |' in capsys.readouterr().out
