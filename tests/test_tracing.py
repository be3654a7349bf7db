"""The plain network under every tracer: torch.jit.script, torch.fx (and timm's FX feature
extractor), torch.export and torch.jit.trace give the eager outputs, for the OpenMMLab
backbone and the timm models."""
import warnings

import pytest
import timm
import torch

from mmconvmlp.models import ConvMLP

#: Fewer blocks than the paper's models: the same code paths, shorter tracing.
SMALL = dict(blocks=(1, 2, 1), widths=(32, 48, 64), mlp_ratios=(2, 2, 2), stem_width=16,
             conv_blocks=2)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so eval mode differs from training mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def assert_same_maps(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def backbone():
    return randomized(ConvMLP(arch=SMALL, out_indices=(0, 1, 2, 3))).eval()


def test_backbone_scripts(backbone):
    scripted = torch.jit.script(backbone)
    x = torch.randn(2, 3, 61, 70)
    with torch.no_grad():
        assert_same_maps(scripted(x), backbone(x))


def test_backbone_fx_traces_in_eval_and_training(backbone):
    traced = torch.fx.symbolic_trace(backbone)
    x = torch.randn(2, 3, 61, 70)
    with torch.no_grad():
        assert_same_maps(traced(x), backbone(x))
    backbone.train()
    traced = torch.fx.symbolic_trace(backbone)
    torch.manual_seed(1)
    outs = traced(x)
    torch.manual_seed(1)
    assert_same_maps(outs, backbone(x))  # batch statistics and drop path alike
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in traced.parameters())


def test_backbone_exports(backbone):
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(backbone, (x,))
    with torch.no_grad():
        assert_same_maps(exported.module()(x), backbone(x))


def test_backbone_jit_trace_follows_the_batch_size(backbone):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracing's own notes
        traced = torch.jit.trace(backbone, torch.randn(2, 3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_same_maps(traced(x), backbone(x))


@pytest.mark.parametrize('arch', ['s'])
def test_timm_classifier_scripts_and_fx_traces(arch):
    model = randomized(timm.create_model(f'convmlp_{arch}', num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected)


def test_timm_fx_features_equal_the_default_features():
    torch.manual_seed(1)
    getter = timm.create_model('convmlp_s', features_only=True).eval()
    torch.manual_seed(1)  # the same weights
    fx = timm.create_model('convmlp_s', features_only=True, feature_cls='fx').eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = getter(x)
        assert_same_maps(fx(x), expected)
        assert [m.shape[1] for m in expected] == fx.feature_info.channels()
