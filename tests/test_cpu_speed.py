"""The CPU speed layers (mmconvmlp.models.cpu_speed) against the plain network: inference in
bands with folded BatchNorms and oneDNN's fused calls (AVX-512 and AVX2 simulated), the
weight-gradient route of training (both routes forced), and how they are applied."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmconvmlp.models import (ARCH_SETTINGS, ConvMLP, accelerate_for_cpu,
                              accelerate_for_cpu_inference, accelerate_for_cpu_training,
                              remove_cpu_acceleration)
from mmconvmlp.models.convmlp import ConvMLPBlock
from mmconvmlp.models.cpu_speed import inference, onednn, row_bands, weight_grads
from mmconvmlp.models.cpu_speed.hook import CPUAccelerationHook
from mmconvmlp.testing import ReferenceConvMLP
from test_backbone import assert_outputs_and_gradients_match, copy_weights

CAPABILITIES = ['AVX2', 'AVX512']


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomized(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and LayerNorm affines, so folding and fusing show."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module


def plain_and_fast(arch='s', **kwargs):
    """A plain ConvMLP in eval mode and an accelerated copy holding the same weights."""
    plain = randomized(ConvMLP(arch=arch, **kwargs)).eval()
    fast = ConvMLP(arch=arch, **kwargs).eval()
    fast.load_state_dict(plain.state_dict())
    return plain, accelerate_for_cpu_inference(fast)


class OpRecorder(TorchDispatchMode):
    """Collects the names of the ATen and oneDNN ops that run."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=CAPABILITIES)
def capability(request, monkeypatch) -> str:
    """A CPU whose PyTorch kernels run AVX2 or AVX-512 (only the choice is simulated)."""
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: request.param)
    return request.param


def expects_fused(capability: str) -> bool:
    return capability == 'AVX512' and torch.backends.mkldnn.is_available()


def record_band_runs(monkeypatch) -> list:
    """Make bands one output row (or one pixel) high and return a list that collects
    'rows' for each part and 'pixels' for each channel MLP that ran in bands."""
    monkeypatch.setattr(row_bands, 'BAND_BYTES', 1)
    runs = []
    for kind, name in (('rows', 'run_in_bands'), ('pixels', 'run_pixels_in_bands')):
        def recorded(*args, kind=kind, run=getattr(inference, name), **kwargs):
            runs.append(kind)
            return run(*args, **kwargs)
        monkeypatch.setattr(inference, name, recorded)
    return runs


# -- inference -----------------------------------------------------------------------------

def test_fused_calls_only_for_float32_on_avx512_cpus_outside_autocast(capability):
    x = torch.randn(4, 8)
    assert onednn.fuses(x) == expects_fused(capability)
    assert not onednn.fuses(x.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not onednn.fuses(x)


def test_accelerated_inference_matches_the_reference_on_either_route(capability, monkeypatch):
    plain, fast = plain_and_fast()
    reference = ReferenceConvMLP('s').eval()
    reference.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 97, 130)
    # Small bands: several per map, ragged at the bottom.
    monkeypatch.setattr(row_bands, 'BAND_BYTES', 40 << 10)
    recorder = OpRecorder()
    with torch.no_grad():
        with recorder:
            outs = fast(x)
        refs = reference(x)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.is_contiguous()
        assert relative_error(out, ref) < 1e-5
    assert ('mkldnn._linear_pointwise' in recorder.ops) == expects_fused(capability)
    assert ('aten.gelu' in recorder.ops) != expects_fused(capability)
    # BatchNorms folded: none runs as its own op.
    assert not any('batch_norm' in op for op in recorder.ops)


@pytest.mark.parametrize('arch,shape', [('s', (1, 3, 111, 150)), ('l', (2, 3, 67, 45))])
def test_every_part_runs_in_bands_and_matches_the_plain_network(monkeypatch, arch, shape):
    plain, fast = plain_and_fast(arch)
    x = torch.randn(shape)
    runs = record_band_runs(monkeypatch)
    with torch.no_grad():
        expected = plain(x)
        assert runs == [], 'the plain network never takes the fast route'
        outs = fast(x)
    assert runs.count('rows') == 2  # the tokenizer and the conv stage
    assert runs.count('pixels') == 2 * sum(ARCH_SETTINGS[arch]['blocks'])
    for out, exp in zip(outs, expected):
        assert out.shape == exp.shape and out.is_contiguous()
        assert relative_error(out, exp) < 1e-5


def test_fast_route_only_where_no_graph_is_recorded(monkeypatch):
    runs = record_band_runs(monkeypatch)
    x = torch.randn(1, 3, 40, 48)
    model = accelerate_for_cpu_inference(ConvMLP(arch='s', drop_path_rate=0.))
    with torch.no_grad():
        model(x)  # training mode: BatchNorms need whole-map statistics, MLPs need nothing
    assert runs.count('rows') == 0 and runs.count('pixels') == 16
    runs.clear()
    model.eval()
    model(x)  # parameters that want gradients
    assert runs == []
    with torch.no_grad():
        model(x)
    assert runs.count('rows') == 2 and runs.count('pixels') == 16
    # Frozen parts run in bands in training too, and the rest still learns.
    runs.clear()
    model = accelerate_for_cpu_inference(ConvMLP(arch='s', frozen_stages=2).train())
    sum(o.sum() for o in model(x)[2:]).backward()
    assert runs.count('rows') == 2 and runs.count('pixels') == 4
    assert all(p.grad is not None for p in model.stages[1:].parameters())


def test_mlp_block_in_bands_matches_its_plain_computation(capability, monkeypatch):
    block = randomized(ConvMLPBlock(48, 96, drop_path=0.2)).eval()
    x = torch.randn(2, 9, 11, 48)
    with torch.no_grad():
        expected = block(x)
    monkeypatch.setattr(row_bands, 'BAND_BYTES', 40 * 96 * 4)  # bands of 40 pixels
    accelerate_for_cpu_inference(block)
    with torch.no_grad():
        out = block(x)
    assert type(block) is inference.BandedConvMLPBlock
    assert out.shape == x.shape and out.is_contiguous()
    assert relative_error(out, expected) < 1e-5


def test_stochastic_depth_takes_the_plain_route(monkeypatch):
    runs = record_band_runs(monkeypatch)
    block = randomized(ConvMLPBlock(16, 32, drop_path=0.5)).train()
    x = torch.randn(8, 5, 6, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = block(x)
        accelerate_for_cpu_inference(block)
        torch.manual_seed(1)
        out = block(x)
    assert runs == [] and torch.equal(out, expected)


@pytest.mark.parametrize('rows_per_band', [16, 8, 5, 1])  # 1, 2, 4 (ragged), 16 bands
def test_bands_return_what_whole_maps_return_under_autocast(monkeypatch, rows_per_band):
    plain, fast = plain_and_fast()
    x = torch.randn(1, 3, 64, 72)  # tokenizer output: 16 rows of 18 pixels, 64 channels
    monkeypatch.setattr(row_bands, 'BAND_BYTES', rows_per_band * 64 * 18 * 2)
    with torch.no_grad():
        exact = plain(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            expected = plain(x)
            outs = fast(x)
    # bfloat16 rounds the folded and the unfolded BatchNorms differently: both are held
    # against float32, and the fast route may not round worse than the plain one.
    for out, exp, truth in zip(outs, expected, exact):
        assert out.dtype == exp.dtype == torch.bfloat16
        assert out.shape == exp.shape
        assert relative_error(out.float(), truth) < 1.25 * relative_error(exp.float(), truth) \
            + 1e-3


def test_an_empty_batch_gives_empty_maps():
    plain, fast = plain_and_fast()
    with torch.no_grad():
        for out, exp in zip(fast(torch.randn(0, 3, 64, 48)), plain(torch.randn(1, 3, 64, 48))):
            assert out.shape == (0, *exp.shape[1:])


def test_group_norm_keeps_the_plain_route_in_bands_of_pixels_only(monkeypatch):
    """A norm that cannot be folded leaves the front end plain; the MLP blocks still band."""
    runs = record_band_runs(monkeypatch)
    model = ConvMLP(arch='s', norm_cfg=dict(type='GN', num_groups=8)).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        expected = model(x)
        outs = accelerate_for_cpu_inference(model)(x)
    assert runs.count('rows') == 0 and runs.count('pixels') == 16
    for out, exp in zip(outs, expected):
        assert relative_error(out, exp) < 1e-5


def test_traced_accelerated_block_holds_the_plain_ops(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    block = accelerate_for_cpu_inference(ConvMLPBlock(16, 32).eval())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(block, torch.randn(1, 4, 5, 16))
    graph = str(traced.inlined_graph)
    assert 'aten::linear' in graph and 'mkldnn' not in graph


@pytest.mark.parametrize('height', [7, 8, 9])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('kind', ['conv', 'maxpool'])
def test_row_bands_at_the_edges_match_the_whole_map(monkeypatch, kind, stride, height):
    if kind == 'conv':
        layer = nn.Conv2d(4, 6, 3, stride, 1)
        op = row_bands.ConvRows(layer, layer.weight, layer.bias, relu=False)
    else:
        layer = nn.MaxPool2d(3, stride, 1)
        op = row_bands.MaxPoolRows(layer, relu=False)
    x = torch.randn(2, 4, height, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = layer(x)
        row_bytes = expected.shape[0] * expected.shape[1] * expected.shape[3] * 4
        for rows_per_band in range(1, expected.shape[2] + 1):
            monkeypatch.setattr(row_bands, 'BAND_BYTES', rows_per_band * row_bytes)
            out = row_bands.run_in_bands(op, x)
            assert out.shape == expected.shape
            assert torch.allclose(out, expected, atol=1e-6), rows_per_band


def test_row_bands_pad_no_copies_except_max_pooling_at_the_bottom(monkeypatch):
    pads, pad = [], F.pad

    def recorded_pad(x, widths, value=0.):
        pads.append(value)
        return pad(x, widths, value=value)
    monkeypatch.setattr(row_bands.F, 'pad', recorded_pad)
    monkeypatch.setattr(row_bands, 'BAND_BYTES', 1)  # one output row per band
    model = accelerate_for_cpu_inference(ConvMLP(arch='s', out_indices=(0, 1)).eval())
    with torch.no_grad():
        model(torch.randn(1, 3, 66, 48))  # the max-pool's input, 33 rows high, is odd
    assert pads and all(value == float('-inf') for value in pads)


# -- training: the weight-gradient route -----------------------------------------------------

def count_channels_first_weight_grads(monkeypatch) -> list:
    calls = []
    apply = weight_grads._ChannelsFirstWeightGrad.apply

    def counted(*args):
        calls.append(args[0].shape)
        return apply(*args)
    monkeypatch.setattr(weight_grads._ChannelsFirstWeightGrad, 'apply', counted)
    return calls


@pytest.mark.parametrize('weight_grad_layout', ['channels_last', 'channels_first'])
@pytest.mark.parametrize('norm_eval', [False, True])
def test_both_weight_gradient_routes_match_the_plain_network(monkeypatch, weight_grad_layout,
                                                             norm_eval):
    """Each kind of CPU simulated: AVX-512 (weight gradients in channels-last memory) and
    AVX2 (from channels-first copies; here on every dense conv, not just large maps). Both
    layers applied, as the runner's hook does, against the plain network with the same
    weights (which tests/test_backbone.py holds against the reference)."""
    monkeypatch.setattr(weight_grads, '_forced', weight_grad_layout)
    monkeypatch.setattr(weight_grads, 'MIN_PIXELS', 1)
    monkeypatch.setattr(weight_grads, 'MIN_WORK', 1)
    calls = count_channels_first_weight_grads(monkeypatch)
    plain = randomized(ConvMLP(arch='s', norm_eval=norm_eval, drop_path_rate=0.)).train()
    model = copy_weights(plain, ConvMLP(arch='s', norm_eval=norm_eval, drop_path_rate=0.))
    accelerate_for_cpu(model.train())
    assert_outputs_and_gradients_match(model, plain, torch.randn(2, 3, 64, 48))
    # tokenizer 3, conv stage 2 + 1, MLP stage downsamplings 2: every 3x3 dense conv
    assert len(calls) == (8 if weight_grad_layout == 'channels_first' else 0)


def test_channels_first_route_only_on_large_maps(monkeypatch):
    monkeypatch.setattr(weight_grads, '_forced', 'channels_first')
    conv = nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)

    def takes(shape, **kwargs) -> bool:
        x = torch.randn(shape, **kwargs).contiguous(memory_format=torch.channels_last)
        return weight_grads.takes_channels_first_weight_grad(conv, x, conv.weight)
    assert takes((1, 64, 128, 128))
    assert not takes((1, 64, 48, 48))  # the copies would cost more than they save
    assert not takes((1, 64, 128, 128), dtype=torch.bfloat16)
    with torch.no_grad():
        assert not takes((1, 64, 128, 128))
    monkeypatch.setattr(weight_grads, '_forced', 'channels_last')
    assert not takes((1, 64, 128, 128))


@pytest.mark.parametrize('times,slow', [((3.0, 1.0), True), ((1.2, 1.0), False),
                                         ((0.7, 1.0), False)])
def test_weight_grad_layout_follows_the_probe(monkeypatch, times, slow):
    monkeypatch.setattr(weight_grads, 'weight_grad_probe', lambda: times)
    weight_grads.channels_last_weight_grad_is_slow.cache_clear()
    try:
        assert weight_grads.weight_grad_layout() == ('channels_first' if slow
                                                     else 'channels_last')
    finally:
        weight_grads.channels_last_weight_grad_is_slow.cache_clear()


def test_set_weight_grad_layout_checks_its_argument(monkeypatch):
    monkeypatch.setattr(weight_grads, '_forced', None)
    weight_grads.set_weight_grad_layout('channels_first')
    assert weight_grads.weight_grad_layout() == 'channels_first'
    weight_grads.set_weight_grad_layout('auto')
    assert weight_grads._forced is None
    with pytest.raises(ValueError, match='channels_first'):
        weight_grads.set_weight_grad_layout('nhwc')


# -- applying and removing the layers -------------------------------------------------------

def test_layers_change_classes_only_and_remove_restores_the_plain_network():
    model = ConvMLP(arch='s').eval()
    plain_types = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    accelerate_for_cpu(model)
    accelerate_for_cpu(model)  # twice is once
    fast_types = [type(m).__name__ for m in model.modules()]
    assert 'BandedTokenizer' in fast_types and 'BandedConvMLPBlock' in fast_types
    assert fast_types.count('ChannelsFirstWeightGradConv2d') == 8
    assert list(model.state_dict()) == keys
    remove_cpu_acceleration(model)
    assert [type(m) for m in model.modules()] == plain_types
    torch.jit.script(model)  # the plain network again


def test_accelerated_model_pickles_and_copies():
    plain, fast = plain_and_fast()
    accelerate_for_cpu_training(fast)
    x = torch.randn(1, 3, 48, 48)
    for copied in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert type(copied.tokenizer) is inference.BandedTokenizer
        with torch.no_grad():
            for out, exp in zip(copied(x), plain(x)):
                assert relative_error(out, exp) < 1e-5


def test_hook_applies_both_layers_to_the_runners_model():
    class Runner:
        model = nn.Sequential(ConvMLP(arch='s'), nn.Identity())
    CPUAccelerationHook().before_run(Runner)
    types = {type(m).__name__ for m in Runner.model.modules()}
    assert {'BandedTokenizer', 'BandedConvStage', 'BandedConvMLPBlock',
            'ChannelsFirstWeightGradConv2d'} <= types
