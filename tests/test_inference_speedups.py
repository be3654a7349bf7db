"""The eager inference paths of the backbone: oneDNN's fused linear calls where PyTorch runs
AVX-512 kernels (both choices simulated), channel MLPs with their LayerNorms and residual
sums a band of pixels at a time, and row bands that pad at the map's edges by the ops' own
padding instead of padded copies."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmconvmlp.models import ConvMLP, convmlp, fused_linear, row_bands
from mmconvmlp.models.convmlp import ConvMLPBlock
from mmconvmlp.testing import ReferenceConvMLP

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


def test_fused_calls_only_for_float32_on_avx512_cpus_outside_autocast(capability):
    x = torch.randn(4, 8)
    assert fused_linear.fuses(x) == expects_fused(capability)
    assert not fused_linear.fuses(x.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not fused_linear.fuses(x)


def test_inference_matches_plain_reference_on_either_route(capability, monkeypatch):
    model = randomized(ConvMLP(arch='s')).eval()
    reference = ReferenceConvMLP('s').eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 97, 130)
    # Small bands: several per map, ragged at the bottom.
    monkeypatch.setattr(row_bands, 'BAND_BYTES', 40 << 10)
    recorder = OpRecorder()
    with torch.no_grad():
        with recorder:
            outs = model(x)
        refs = reference(x)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.is_contiguous()
        assert relative_error(out, ref) < 1e-5
    assert ('mkldnn._linear_pointwise' in recorder.ops) == expects_fused(capability)
    assert ('aten.gelu' in recorder.ops) != expects_fused(capability)


def test_mlp_block_in_bands_matches_its_plain_computation(capability, monkeypatch):
    block = randomized(ConvMLPBlock(48, 96, drop_path=0.2)).eval()
    x = torch.randn(2, 9, 11, 48)
    expected = block(x)  # parameters that want gradients: the plain path
    monkeypatch.setattr(row_bands, 'BAND_BYTES', 40 * 96 * 4)  # bands of 40 pixels
    with torch.no_grad():
        out = block(x)
    assert out.shape == x.shape and out.is_contiguous()
    assert relative_error(out, expected.detach()) < 1e-5


def test_stochastic_depth_keeps_the_plain_path_without_gradients(monkeypatch):
    block = randomized(ConvMLPBlock(16, 32, drop_path=0.5)).train()
    x = torch.randn(8, 5, 6, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        out = block(x)
        with monkeypatch.context() as plain:
            plain.setattr(convmlp, 'may_run_in_bands', lambda module, x: False)
            torch.manual_seed(1)
            expected = block(x)
    assert torch.equal(out, expected)


def test_traced_block_holds_no_fused_calls(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    block = ConvMLPBlock(16, 32).eval()
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
    model = ConvMLP(arch='s', out_indices=(0, 1)).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 66, 48))  # the max-pool's input, 33 rows high, is odd
    assert pads and all(value == float('-inf') for value in pads)
