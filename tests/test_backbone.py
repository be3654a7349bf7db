"""The ConvMLP backbone: architecture, taps, options, checkpoints and errors."""
import io
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

from mmconvmlp.models import ARCH_SETTINGS, CheckpointMismatchError, ConvMLP
from mmconvmlp.models.convmlp import ConvMLPBlock
from mmconvmlp.testing import ReferenceConvMLP

STRIDES = (4, 8, 16, 32)


def tap_size(size: int, stride: int) -> int:
    """Each stride-2 step (3x3 kernel, padding 1) maps n to ceil(n / 2)."""
    for _ in range(int(math.log2(stride))):
        size = math.ceil(size / 2)
    return size


def randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics and affine weights, so BN folding is exercised."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def authors_checkpoint(arch: str, path, classes: int = 1000) -> ReferenceConvMLP:
    """Write an ImageNet checkpoint in the authors' layout (with its classifier) and return
    the plain model that holds the same backbone weights."""
    reference = ReferenceConvMLP(arch)
    randomize_batchnorm(reference)
    state = reference.state_dict()
    width = ARCH_SETTINGS[arch]['widths'][-1]
    state.update({'norm.weight': torch.ones(width), 'norm.bias': torch.zeros(width),
                  'head.weight': torch.randn(classes, width), 'head.bias': torch.zeros(classes)})
    torch.save(state, path)
    return reference.eval()


@pytest.fixture(scope='module')
def paper_models():
    """ConvMLP-S/M/L in eval mode, built once for the tests that only read them."""
    return {arch: ConvMLP(arch=arch).eval() for arch in ('s', 'm', 'l')}


@pytest.mark.parametrize('arch', ['s', 'm', 'l'])
def test_taps_shapes_and_channels(paper_models, arch):
    model = paper_models[arch]
    settings = ARCH_SETTINGS[arch]
    expected_channels = (settings['stem_width'], *settings['widths'])
    assert model.out_channels == expected_channels
    for size in ((64, 64), (97, 131), (160, 96), (33, 250)):
        with torch.no_grad():
            outs = model(torch.randn(1, 3, *size))
        assert len(outs) == 4
        for out, channels, stride in zip(outs, expected_channels, STRIDES):
            assert out.shape == (1, channels, tap_size(size[0], stride),
                                 tap_size(size[1], stride)), (size, stride)
            assert out.is_contiguous()


def test_parameter_count_matches_paper_with_classifier(paper_models):
    # The paper counts the ImageNet classifier: LayerNorm(D2) + Linear(D2 -> 1000).
    for arch, paper in (('s', 9.0), ('m', 17.4), ('l', 42.7)):
        width = ARCH_SETTINGS[arch]['widths'][-1]
        backbone = sum(p.numel() for p in paper_models[arch].parameters())
        assert round((backbone + 2 * width + width * 1000 + 1000) / 1e6, 1) == paper, arch


def test_out_indices_select_taps_and_channels():
    model = ConvMLP(arch='s', out_indices=(1, 3)).eval()
    assert model.out_channels == (128, 512)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 512]
    assert ConvMLP(out_indices=-1).out_channels == (512,)
    assert ConvMLP(out_indices=2).out_indices == (2,)


def test_later_parts_are_not_run_when_not_tapped():
    model = ConvMLP(arch='s', out_indices=(0, 1)).eval()
    calls = []
    model.stages[0].register_forward_hook(lambda *args: calls.append('stage0'))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_matches_plain_reference_in_eval_mode():
    model = ConvMLP(arch='s').eval()
    randomize_batchnorm(model)
    reference = ReferenceConvMLP('s').eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 111, 150)
    with torch.no_grad():
        for out, ref in zip(model(x), reference(x)):
            assert relative_error(out, ref) < 1e-5


def test_matches_plain_reference_in_training_outputs_gradients_and_stats():
    # In float64: float32 BatchNorm statistics of channels-last maps are summed in another
    # order than channels-first ones (about 1e-5 relative apart with one thread), and the
    # tokenizer's three BatchNorms amplify that to 1e-2 in some gradients, which would hide
    # a real error as well as make one up.
    model = ConvMLP(arch='s', drop_path_rate=0.3).train().double()
    reference = ReferenceConvMLP('s', drop_path_rate=0.3).train().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 64, 80, dtype=torch.float64)
    torch.manual_seed(3)  # the same stochastic-depth draws in both models
    outs = model(x)
    torch.manual_seed(3)
    refs = reference(x)
    for out, ref in zip(outs, refs):
        assert relative_error(out, ref) < 1e-5
    cotangents = [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, cotangents)).backward()
    sum((r * g).sum() for r, g in zip(refs, cotangents)).backward()
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert relative_error(param.grad, ref_params[name].grad) < 1e-4, name
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.allclose(buf.float(), ref_buffers[name].float(), rtol=1e-4, atol=1e-6), name


def test_authors_imagenet_checkpoint_loads_through_init_cfg(tmp_path):
    path = tmp_path / 'convmlp_s_imagenet.pth'
    reference = authors_checkpoint('s', path)
    model = ConvMLP(arch='s', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    model.eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # the loaded convolution weights keep the layout of the activations they meet
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in model.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for out, ref in zip(model(x), reference(x)):
            assert relative_error(out, ref) < 1e-5


def test_detector_checkpoint_loads_with_backbone_prefix(tmp_path):
    reference = ReferenceConvMLP('s')
    state = {f'backbone.{k}': v for k, v in reference.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': state, 'meta': {'epoch': 12}}, path)
    model = ConvMLP(init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    model.init_weights()
    assert torch.equal(model.stages[1].blocks[3].connect.weight,
                       reference.stages[1].blocks[3].connect.weight)


def test_checkpoint_mismatches_are_named(tmp_path):
    state = ReferenceConvMLP('s').state_dict()
    del state['stages.2.blocks.1.norm2.weight']
    state['stages.3.blocks.0.norm1.weight'] = torch.ones(3)
    path = tmp_path / 'broken.pth'
    torch.save(state, path)
    model = ConvMLP(arch='s', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    before = model.tokenizer.block[0].weight.clone()
    with pytest.raises(CheckpointMismatchError) as err:
        model.init_weights()
    message = str(err.value)
    assert 'stages.2.blocks.1.norm2.weight' in message
    assert 'stages.3.blocks.0.norm1.weight' in message
    assert torch.equal(model.tokenizer.block[0].weight, before), 'nothing may be half-loaded'


def test_checkpoint_of_another_arch_is_reported_with_shapes(tmp_path):
    path = tmp_path / 'convmlp_l.pth'
    torch.save(ReferenceConvMLP('l').state_dict(), path)
    model = ConvMLP(arch='s', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointMismatchError, match=r'(?s)arch.*tokenizer\.block\.0\.weight'):
        model.init_weights()


def test_detector_checkpoint_without_prefix_says_how_to_fix(tmp_path):
    state = {f'backbone.{k}': v for k, v in ReferenceConvMLP('s').state_dict().items()}
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': state}, path)
    model = ConvMLP(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointMismatchError, match="prefix='backbone.'"):
        model.init_weights()


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 4])
def test_frozen_stages(frozen_stages):
    model = ConvMLP(arch='s', frozen_stages=frozen_stages, drop_path_rate=0.)
    model.train()
    parts = model.parts()
    stats = parts[0].block[1].running_mean.clone()
    loss = sum(o.sum() for o in model(torch.randn(2, 3, 64, 64)))
    assert loss.requires_grad == (frozen_stages < 4)
    if loss.requires_grad:
        loss.backward()
    for index, part in enumerate(parts):
        frozen = index <= frozen_stages
        assert all(p.requires_grad != frozen for p in part.parameters()), index
        assert all((p.grad is None) == frozen for p in part.parameters()), index
        norms = [m for m in part.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(m.training != frozen for m in norms), index
    assert torch.equal(parts[0].block[1].running_mean, stats) == (frozen_stages >= 0)


def test_norm_eval_keeps_batchnorm_statistics():
    model = ConvMLP(arch='s', norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.stages[0].training  # everything else still trains (drop path)
    stats = [m.running_mean.clone() for m in norms]
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))
    # Trainable folded BatchNorms still get gradients.
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    assert model.tokenizer.block[1].weight.grad is not None


def test_norm_cfg_builds_the_requested_norm_layers():
    model = ConvMLP(arch='s', norm_cfg=dict(type='SyncBN', requires_grad=False))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 + 3 * 2
    assert all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    gn = ConvMLP(arch='s', norm_cfg=dict(type='GN', num_groups=8)).train()
    assert isinstance(gn.tokenizer.block[1], nn.GroupNorm)
    assert gn(torch.randn(1, 3, 64, 64))[0].shape == (1, 64, 16, 16)


def test_drop_path_rates_rise_within_each_stage():
    model = ConvMLP(arch='s')
    for stage, blocks in zip(model.stages, ARCH_SETTINGS['s']['blocks']):
        rates = [getattr(b.drop_path, 'drop_prob', 0.) for b in stage.blocks]
        assert rates == pytest.approx(torch.linspace(0, 0.1, blocks).tolist())
    model = ConvMLP(arch='s', drop_path_rate=0.3)
    assert model.stages[1].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert ConvMLP(drop_path_rate=0.).stages[1].blocks[-1].drop_path.drop_prob == 0.


def test_drop_path_is_active_in_training_only():
    model = ConvMLP(arch='s', out_indices=(3,), drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    assert not torch.allclose(model(x)[0], model(x)[0])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])


def test_with_cp_gives_same_outputs_gradients_and_statistics():
    x = torch.randn(2, 3, 64, 64)
    results = []
    for with_cp in (False, True):
        torch.manual_seed(1)
        model = ConvMLP(arch='s', with_cp=with_cp).train()
        torch.manual_seed(2)  # the same drop-path draws in both runs
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
    (outs, grads, bufs), (outs_cp, grads_cp, bufs_cp) = results
    for a, b in zip(outs, outs_cp):
        assert torch.allclose(a, b, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], grads_cp[name], rtol=1e-4, atol=1e-7), name
    for name in bufs:
        assert torch.equal(bufs[name], bufs_cp[name]), name


def test_with_cp_recomputes_blocks_in_backward():
    model = ConvMLP(arch='s', with_cp=True, out_indices=(2,)).train()
    calls = []
    model.stages[0].blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    model(torch.randn(1, 3, 64, 64))[0].sum().backward()
    assert len(calls) == 2


def test_mlp_block_keeps_channels_last_memory():
    block = ConvMLPBlock(32, 64).eval()
    x = torch.randn(2, 9, 11, 32)
    with torch.no_grad():
        out = block(x)
    assert out.shape == x.shape and out.is_contiguous()


@pytest.mark.parametrize('arch', ['xl', 'ConvMLP-S', 3])
def test_unknown_arch_names_the_valid_ones(arch):
    with pytest.raises((ValueError, TypeError), match=r"'l', 'm', 's'|str or a dict"):
        ConvMLP(arch=arch)


def test_custom_arch_dict():
    arch = dict(blocks=(1, 1, 1), widths=(32, 48, 64), mlp_ratios=(1, 2, 1), stem_width=16,
                conv_blocks=1)
    model = ConvMLP(arch=arch).eval()
    assert model.out_channels == (16, 32, 48, 64)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 33))[3].shape == (1, 64, 2, 2)
    with pytest.raises(ValueError, match=r"missing keys \['conv_blocks'\]"):
        ConvMLP(arch={k: v for k, v in arch.items() if k != 'conv_blocks'})
    with pytest.raises(ValueError, match='3 values'):
        ConvMLP(arch=dict(arch, blocks=(1, 1)))


@pytest.mark.parametrize('out_indices', [4, (0, 5), (), (2, 1), (1, 1), ('a',), -5, True,
                                         (0, True)])
def test_bad_out_indices_name_the_valid_ones(out_indices):
    with pytest.raises(ValueError, match=r'out_indices=.*give indices of the 4 feature maps'):
        ConvMLP(out_indices=out_indices)


@pytest.mark.parametrize('frozen_stages', [-2, 5, 1.5, True, False])
def test_bad_frozen_stages(frozen_stages):
    with pytest.raises(ValueError, match='frozen_stages'):
        ConvMLP(frozen_stages=frozen_stages)


def test_registered_in_mmdet_and_mmseg_scopes():
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    from mmengine.registry import DefaultScope
    for scope, registry in (('mmdet', DET_MODELS), ('mmseg', SEG_MODELS)):
        with DefaultScope.overwrite_default_scope(scope):
            model = registry.build(dict(type='ConvMLP', arch='m', out_indices=(1, 2, 3)))
        assert isinstance(model, ConvMLP) and model.out_channels == (128, 256, 512)


def test_custom_imports_is_all_a_config_needs(tmp_path):
    """In a fresh interpreter that never imported mmconvmlp, a stock mmdet config with the
    backbone swapped and ``custom_imports`` builds the detector."""
    config = tmp_path / 'retinanet_convmlp.py'
    config.write_text(textwrap.dedent("""
        _base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
        custom_imports = dict(imports=['mmconvmlp'], allow_failed_imports=False)
        model = dict(
            backbone=dict(_delete_=True, type='ConvMLP', arch='s', out_indices=(1, 2, 3)),
            neck=dict(in_channels=[128, 256, 512], start_level=0))
    """))
    script = textwrap.dedent(f"""
        import sys
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        assert 'mmconvmlp' not in sys.modules
        cfg = Config.fromfile({str(config)!r})
        init_default_scope(cfg.default_scope)
        from mmdet.registry import MODELS
        model = MODELS.build(cfg.model)
        print(type(model.backbone).__name__, model.backbone.out_channels)
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'ConvMLP (128, 256, 512)' in result.stdout


@pytest.mark.parametrize('change', [
    dict(blocks=(0, 1, 1)), dict(blocks=(1, -1, 1)), dict(widths=(32, 0, 64)),
    dict(widths=(32, 48.5, 64)), dict(mlp_ratios=(1, 0, 1)), dict(mlp_ratios=(1, 0.01, 1)),
    dict(stem_width=0), dict(conv_blocks=0), dict(conv_blocks=True)])
def test_custom_arch_values_out_of_range_name_the_valid_range(change):
    arch = dict(blocks=(1, 1, 1), widths=(32, 48, 64), mlp_ratios=(1, 2, 1), stem_width=16,
                conv_blocks=1)
    with pytest.raises(ValueError, match=rf"Custom ConvMLP arch: invalid {next(iter(change))}="
                                         r".*(>= 1|> 0|>= 2)"):
        ConvMLP(arch=dict(arch, **change))


@pytest.mark.parametrize('rate', [1.0, 1.5, -0.1, float('nan'), True, '0.1'])
def test_drop_path_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(ValueError, match=r'drop_path_rate=.* give a stochastic-depth rate in '
                                         r'\[0, 1\)'):
        ConvMLP(drop_path_rate=rate)


def test_drop_path_rate_just_below_one_trains_to_finite_values():
    model = ConvMLP(arch='s', out_indices=(3,), drop_path_rate=0.99).train()
    assert torch.isfinite(model(torch.randn(4, 3, 32, 32))[0]).all()


def write_reference_checkpoint(path, drop: str = '') -> ReferenceConvMLP:
    reference = ReferenceConvMLP('s')
    randomize_batchnorm(reference)
    state = reference.state_dict()
    state.pop(drop, None)
    torch.save(state, path)
    return reference


def test_init_cfg_list_with_pretrained_loads_strictly(tmp_path):
    path = tmp_path / 'broken.pth'
    write_reference_checkpoint(path, drop='stages.1.blocks.0.norm1.bias')
    model = ConvMLP(init_cfg=[dict(type='Constant', layer='LayerNorm', val=2., bias=0.),
                              dict(type='Pretrained', checkpoint=str(path))])
    with pytest.raises(CheckpointMismatchError, match=r'stages\.1\.blocks\.0\.norm1\.bias'):
        model.init_weights()


def test_init_cfg_list_applies_other_entries_then_the_checkpoint(tmp_path):
    path = tmp_path / 'convmlp_s.pth'
    reference = write_reference_checkpoint(path)
    model = ConvMLP(init_cfg=[dict(type='Pretrained', checkpoint=str(path)),
                              dict(type='Constant', layer='LayerNorm', val=2., bias=0.)])
    model.init_weights()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.init_cfg[1]['type'] == 'Constant'  # the config is left as given
    with pytest.raises(ValueError, match='2 Pretrained entries'):
        ConvMLP(init_cfg=[dict(type='Pretrained', checkpoint=str(path))] * 2).init_weights()


def test_init_cfg_list_without_pretrained_goes_through_mmengine():
    model = ConvMLP(init_cfg=[dict(type='Constant', layer='LayerNorm', val=2., bias=0.)])
    model.init_weights()
    assert torch.equal(model.stages[0].blocks[0].norm1.weight, torch.full((128,), 2.))


def test_traced_backbone_follows_the_batch_size():
    model = ConvMLP(arch='s', out_indices=(0, 1)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation, and tracing's own notes
        traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))
        saved = io.BytesIO()
        torch.jit.save(traced, saved)  # no Python calls left in the graph
        saved.seek(0)
        loaded = torch.jit.load(saved)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for out, exp in zip(loaded(x), model(x)):
            assert out.shape == exp.shape and torch.allclose(out, exp, atol=1e-5)


def copy_weights(source: nn.Module, target: nn.Module) -> nn.Module:
    target.load_state_dict(source.state_dict())
    return target


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_syncbn_layers_take_the_bn_paths_in_one_process(mode):
    """What one CPU process can check: the SyncBN config builds SyncBatchNorm layers, and
    ConvMLP treats them as BatchNorm (on channels-last maps, in training with batch
    statistics and in eval mode folded into the convolutions), since without a process
    group torch's SyncBatchNorm computes plain BatchNorm. Statistics synchronised across
    processes need CUDA and two ranks at least: a machine with two GPUs, not this test."""
    bn = ConvMLP(arch='s', out_indices=(0, 1), drop_path_rate=0.)
    randomize_batchnorm(bn)
    sync = copy_weights(bn, ConvMLP(arch='s', out_indices=(0, 1), drop_path_rate=0.,
                                    norm_cfg=dict(type='SyncBN')))
    assert isinstance(sync.tokenizer.block[1], nn.SyncBatchNorm)
    x = torch.randn(2, 3, 48, 40)
    for model in (bn, sync):
        model.train(mode == 'train')
    outs, expected = sync(x), bn(x)
    for out, exp in zip(outs, expected):
        assert relative_error(out, exp) < 1e-6
    if mode == 'train':
        sum(o.sum() for o in outs).backward()
        sum(o.sum() for o in expected).backward()
        for (name, p), q in zip(sync.named_parameters(), bn.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            assert p.grad is None or relative_error(p.grad, q.grad) < 1e-5, name
        assert torch.allclose(sync.tokenizer.block[1].running_mean,
                              bn.tokenizer.block[1].running_mean)


def reference_in_mode(model: ConvMLP, frozen_stages: int) -> ReferenceConvMLP:
    """The plain model with ``model``'s weights, training, with every BatchNorm in eval mode
    (as ``norm_eval``) and the parts up to ``frozen_stages`` frozen."""
    reference = copy_weights(model, ReferenceConvMLP('s', drop_path_rate=0.)).train()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    frozen = [reference.tokenizer, reference.conv_stages, *reference.stages]
    for part in frozen[:frozen_stages + 1]:
        part.requires_grad_(False)
    return reference


def assert_outputs_and_gradients_match(model: nn.Module, reference: nn.Module,
                                       x: torch.Tensor, tolerance: float = 1e-5) -> None:
    outs, refs = model(x), reference(x)
    for out, ref in zip(outs, refs):
        assert relative_error(out, ref) < tolerance
    cotangents = [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, cotangents)).backward()
    sum((r * g).sum() for r, g in zip(refs, cotangents)).backward()
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        ref_grad = ref_params[name].grad
        assert (param.grad is None) == (ref_grad is None), name
        if param.grad is not None:
            assert relative_error(param.grad, ref_grad) < tolerance, name


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1])
def test_norm_eval_and_frozen_stages_match_the_reference_in_training(frozen_stages):
    model = ConvMLP(arch='s', norm_eval=True, frozen_stages=frozen_stages, drop_path_rate=0.)
    randomize_batchnorm(model)
    model.train()
    reference = reference_in_mode(model, frozen_stages)
    assert_outputs_and_gradients_match(model, reference, torch.randn(2, 3, 64, 48))


def test_pretrained_of_another_architecture_is_ignored_with_one_warning(monkeypatch):
    """What mmseg's stock configs pass on: no download, one line saying what to do."""
    def no_download(*args, **kwargs):
        raise AssertionError('nothing may be downloaded')
    from mmengine.runner.checkpoint import CheckpointLoader
    monkeypatch.setattr(CheckpointLoader, 'load_checkpoint', no_download)
    for pretrained in ('open-mmlab://resnet50_v1c', 'torchvision://resnet50'):
        with pytest.warns(UserWarning) as caught:
            model = ConvMLP(pretrained=pretrained)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and '\n' not in messages[0]
        assert pretrained in messages[0] and 'init_cfg' in messages[0]
        assert model.init_cfg is None
        model.init_weights()  # initialises from scratch, downloads nothing


def test_pretrained_checkpoint_becomes_init_cfg_with_a_deprecation_warning(tmp_path):
    path = tmp_path / 'convmlp_s.pth'
    reference = write_reference_checkpoint(path)
    with pytest.warns(UserWarning, match='DeprecationWarning: .*pretrained is deprecated.*'
                                         'init_cfg'):
        model = ConvMLP(pretrained=str(path))
    assert model.init_cfg == dict(type='Pretrained', checkpoint=str(path))
    model.init_weights()
    assert torch.equal(model.stages[1].blocks[0].norm1.weight,
                       reference.stages[1].blocks[0].norm1.weight)


def test_init_cfg_wins_over_pretrained_with_a_warning(tmp_path):
    init_cfg = dict(type='Pretrained', checkpoint=str(tmp_path / 'a.pth'))
    with pytest.warns(UserWarning, match='using init_cfg and ignoring pretrained'):
        model = ConvMLP(pretrained=str(tmp_path / 'b.pth'), init_cfg=init_cfg)
    assert model.init_cfg == init_cfg
    with pytest.raises(TypeError, match='pretrained=3 is invalid'):
        ConvMLP(pretrained=3)


def test_stock_mmseg_config_with_pretrained_builds_without_downloading():
    """mmseg's EncoderDecoder hands its ``pretrained`` to the backbone (a config's dicts are
    ConfigDicts, which it sets the key on)."""
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS
    import mmseg.models  # noqa: F401  (registers the segmentors)
    cfg = ConfigDict(type='EncoderDecoder', pretrained='open-mmlab://resnet50_v1c',
               backbone=dict(type='ConvMLP', arch='s'),
               decode_head=dict(type='FCNHead', in_channels=512, in_index=3, channels=16,
                                num_classes=3))
    with DefaultScope.overwrite_default_scope('mmseg'), pytest.warns(UserWarning,
                                                                     match='ignores pretrained'):
        model = SEG_MODELS.build(cfg)
    model.init_weights()
    assert model.backbone.init_cfg is None
