"""ConvMLP as timm models: registration, the paper's classifier, local pretrained weights,
``features_only`` maps, and use inside mmseg's ``TIMMBackbone``.

Expected values come from the plain reference model (:class:`ReferenceConvMLP`) given the
same weights, and from ``torch.nn.functional`` for the classifier's norm and linear layer."""
import itertools
import os.path as osp
import runpy
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F

import mmconvmlp  # noqa: F401  (registers convmlp_s/m/l with timm)
from mmconvmlp.models import ConvMLP, ConvMLPFeatures, load_convmlp_weights
from mmconvmlp.models.timm_models import CHECKPOINT_URLS, ConvMLPClassifier, take_indices
from mmconvmlp.testing import ReferenceConvMLP
from random_weights import randomize_

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
STRIDES = (4, 8, 16, 32)
CHANNELS = {'s': (64, 128, 256, 512), 'm': (64, 128, 256, 512), 'l': (96, 192, 384, 768)}


def reference_taps(model, x, arch='s'):
    """The four maps (B, C, H, W) of the plain reference model holding ``model``'s weights."""
    reference = ReferenceConvMLP(arch).eval()
    state = model.state_dict()
    reference.load_state_dict({name: state[name] for name in reference.state_dict()})
    with torch.no_grad():
        return reference(x)


def final_norm(model, tap):
    """The classifier's LayerNorm on a (B, C, H, W) map, channels last: (B, H, W, C)."""
    return F.layer_norm(tap.permute(0, 2, 3, 1), model.norm.normalized_shape,
                        model.norm.weight, model.norm.bias, model.norm.eps)


def assert_close_to_reference(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_registered_with_pretrained_cfgs():
    assert set(timm.list_models('convmlp_*')) == {'convmlp_s', 'convmlp_m', 'convmlp_l'}
    for arch in 'sml':
        name = f'convmlp_{arch}'
        assert timm.list_pretrained(name) == [f'{name}.in1k']
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == CHECKPOINT_URLS[arch] == \
            f'https://shi-labs.com/projects/convmlp/checkpoints/convmlp_{arch}_imagenet.pth'
        assert cfg.num_classes == 1000 and cfg.input_size == (3, 224, 224)
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN
        assert cfg.std == timm.data.IMAGENET_DEFAULT_STD
        assert cfg.first_conv == 'tokenizer.block.0' and cfg.classifier == 'head'
        assert cfg.crop_pct == 0.875 and cfg.interpolation == 'bicubic'


@pytest.mark.parametrize('arch,millions', [('s', 9.0), ('m', 17.4), ('l', 42.7)])
def test_parameter_counts_match_the_paper(arch, millions):
    model = timm.create_model(f'convmlp_{arch}')
    assert isinstance(model, ConvMLPFeatures)  # the one implementation, not a second one
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    assert [(i['num_chs'], i['reduction']) for i in model.feature_info] == \
        list(zip(CHANNELS[arch], STRIDES))


def test_classifier_is_norm_mean_linear():
    model = randomize_(timm.create_model('convmlp_s', num_classes=7)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        normed = final_norm(model, reference_taps(model, x)[3])  # (B, H/32, W/32, 512)
        expected = F.linear(normed.mean(dim=(1, 2)), model.head.weight, model.head.bias)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
    assert logits.shape == (2, 7)
    assert_close_to_reference(logits, expected)
    assert_close_to_reference(features, normed)
    assert features.shape == (2, 2, 2, 512) and pooled.shape == (2, 512)
    assert model.num_features == model.head_hidden_size == 512
    assert model.get_classifier() is model.head

    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 2, 2, 512)


def test_local_checkpoint_in_the_authors_layout(tmp_path):
    """``pretrained=True`` with a local file: a plain state dict with the authors' names
    (tokenizer.*, conv_stages.*, stages.*, norm.*, head.*) loads as it is."""
    source = randomize_(ConvMLPClassifier('s'))
    state = source.state_dict()
    assert {k.split('.')[0] for k in state} == {'tokenizer', 'conv_stages', 'stages', 'norm',
                                                'head'}
    path = tmp_path / 'convmlp_s_imagenet.pth'
    torch.save(state, path)

    model = timm.create_model('convmlp_s', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], msg=name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source.eval()(x))

    # another number of classes: everything but the classifier comes from the file
    model = timm.create_model('convmlp_s', pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == (5, 512)
    torch.testing.assert_close(model.norm.weight, state['norm.weight'])
    torch.testing.assert_close(model.stages[2].blocks[1].connect.weight,
                               state['stages.2.blocks.1.connect.weight'])


def test_features_only_gives_the_four_maps_of_the_backbone(arch='s'):
    timm_model = timm.create_model(f'convmlp_{arch}', features_only=True,
                                   out_indices=(0, 1, 2, 3)).eval()
    info = timm_model.feature_info
    assert info.channels() == list(CHANNELS[arch])
    assert info.reduction() == list(STRIDES)
    assert info.module_name() == ['tokenizer', 'conv_stages', 'stages.0', 'stages.2']

    # the weights of an OpenMMLab backbone load as they are, and give the reference's maps
    backbone = randomize_(ConvMLP(arch=arch))
    load_convmlp_weights(timm_model.model, backbone.state_dict(), ignore_classifier=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = timm_model(x)
    expected = reference_taps(backbone, x, arch)
    assert len(maps) == 4
    for m, e, c, s in zip(maps, expected, CHANNELS[arch], STRIDES):
        assert m.shape == (2, c, 64 // s, 64 // s)
        assert_close_to_reference(m, e)


def test_features_only_prunes_what_the_chosen_maps_do_not_need():
    full = timm.create_model('convmlp_s', features_only=True)
    assert full.feature_info.out_indices == (0, 1, 2, 3)  # the four maps by default
    last_two = timm.create_model('convmlp_s', features_only=True, out_indices=2)
    assert last_two.feature_info.out_indices == (2, 3)  # timm: an int n is the last n
    model = timm.create_model('convmlp_s', features_only=True, out_indices=(1, -2)).eval()
    assert model.feature_info.channels() == [128, 256]
    assert model.feature_info.reduction() == [8, 16]
    # stages 1 and 2, the norm and the classifier are gone
    assert len(model.model.stages) == 1
    assert not any(n.startswith(('head.', 'norm.', 'stages.1')) for n, _ in
                   model.model.named_parameters())
    full_state = randomize_(full.model).state_dict()
    model.model.load_state_dict({k: full_state[k] for k in model.model.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model(x)
    expected = reference_taps(full.model, x)
    assert [m.shape[1:] for m in maps] == [(128, 8, 8), (256, 4, 4)]
    assert_close_to_reference(maps[0], expected[1])
    assert_close_to_reference(maps[1], expected[2])


#: Every non-empty set of the four maps.
INDEX_SETS = [list(subset) for n in range(1, 5)
              for subset in itertools.combinations(range(4), n)]


def test_indices_are_read_as_timm_reads_them():
    """None: all; an int n: the last n (not map n, as the OpenMMLab backbone reads it); a
    sequence: those maps, negative from the end."""
    assert take_indices(None) == ([0, 1, 2, 3], 3)
    assert [take_indices(n) for n in (1, 2, 4)] == [([3], 3), ([2, 3], 3), ([0, 1, 2, 3], 3)]
    assert take_indices([-1]) == ([3], 3) and take_indices((0, -3)) == ([0, 1], 1)
    for bad in (0, 5, [4], [-5], [], [1.0]):
        with pytest.raises(ValueError, match='ConvMLP feature indices=.*give an int n'):
            take_indices(bad)


def test_forward_intermediates_for_every_index_set():
    """Maps, the final norm (map 3 only) and the final features (normalised only when the
    last map computed is map 3, timm's rule), for each index set, with and without
    ``stop_early`` and ``norm``, against the reference model."""
    model = randomize_(timm.create_model('convmlp_s')).eval()
    x = torch.randn(1, 3, 32, 32)
    taps = reference_taps(model, x)
    ran = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda *args, i=i: ran.append(i))
    for taken, stop_early, norm in itertools.product(INDEX_SETS, (False, True), (False, True)):
        case = f'indices={taken} stop_early={stop_early} norm={norm}'
        ran.clear()
        with torch.no_grad():
            final, maps = model.forward_intermediates(x, indices=taken, norm=norm,
                                                      stop_early=stop_early)
            if stop_early:  # intermediates_only stops early whatever stop_early says
                maps += model.forward_intermediates(x, indices=taken, norm=norm,
                                                    intermediates_only=True)
        assert len(maps) == len(taken) * (2 if stop_early else 1), case
        for got, index in zip(maps, taken * 2):
            expected = taps[index]
            if norm and index == 3:
                expected = final_norm(model, expected).permute(0, 3, 1, 2)
            assert got.is_contiguous(), case
            assert_close_to_reference(got, expected)
        last = max(taken) if stop_early else 3
        expected_final = (final_norm(model, taps[3]) if last == 3
                          else taps[last].permute(0, 2, 3, 1))
        assert final.shape == expected_final.shape, case
        assert_close_to_reference(final, expected_final)
        # MLP stages run: 0 for map 2, 1 and 2 for map 3; with stop_early (and
        # intermediates_only) none after the last map taken
        needed = {0: set(), 1: set(), 2: {0}, 3: {0, 1, 2}}[max(taken)]
        assert set(ran) == (needed if stop_early else {0, 1, 2}), case


def test_forward_intermediates_nhwc_and_bad_indices():
    model = timm.create_model('convmlp_m').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        nhwc = model.forward_intermediates(x, indices=2, output_fmt='NHWC',
                                           intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, c, 64 // s, 64 // s)
                                             for c, s in zip(CHANNELS['m'], STRIDES)]
    assert [tuple(m.shape) for m in nhwc] == [(1, 4, 4, 256), (1, 2, 2, 512)]
    torch.testing.assert_close(nhwc[0], maps[2].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match='ConvMLP feature indices=5: give an int n'):
        model.forward_intermediates(x, indices=5)


def test_inside_mmseg_timm_backbone():
    """mmseg's TIMMBackbone builds the timm ConvMLP and hands FPN the four maps."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):  # whatever scope earlier tests set
        backbone = MODELS.build(dict(type='TIMMBackbone', model_name='convmlp_s',
                                     features_only=True, pretrained=False,
                                     out_indices=(0, 1, 2, 3)))
    backbone.init_weights()
    backbone.eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, c, 64 // s, 64 // s)
                                             for c, s in zip(CHANNELS['s'], STRIDES)]
    assert backbone.timm_model.feature_info.channels() == list(CHANNELS['s'])


def test_timm_backbone_example_runs(capsys):
    """The documented example: Semantic FPN whose backbone is mmseg's TIMMBackbone
    wrapping timm's convmlp_s."""
    runpy.run_path(osp.join(ROOT, 'tools', 'examples', 'timm_convmlp_in_mmseg.py'),
                   run_name='__main__')
    out = capsys.readouterr().out
    assert 'map 3: (1, 512, 2, 2)' in out and 'segmentation logits: (1, 150, 16, 16)' in out


def test_in_chans_sizes_the_first_convolution():
    model = timm.create_model('convmlp_s', in_chans=1, num_classes=7).eval()
    assert model.tokenizer.block[0].weight.shape == (32, 1, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_feature_maps_are_contiguous_nchw():
    """mmcv's CPU RoIAlign reads its input's memory as NCHW, whatever its strides."""
    model = timm.create_model('convmlp_s', features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert len(maps) == 4 and all(m.is_contiguous() for m in maps)


@pytest.mark.parametrize('order', ['mmconvmlp first', 'timm first'])
def test_import_registers_with_timm_without_importing_it(order):
    """``import mmconvmlp`` leaves timm (and torchvision, huggingface_hub) unimported, and the
    models are in timm's registry whichever of the two is imported first."""
    first, second = ('mmconvmlp', 'timm') if order == 'mmconvmlp first' else ('timm', 'mmconvmlp')
    script = textwrap.dedent(f"""
        import sys
        import {first}
        heavy = [m for m in ('timm', 'torchvision', 'huggingface_hub') if m in sys.modules]
        assert {first == 'timm'} or not heavy, heavy
        import {second}
        print(timm.list_models('convmlp*'), type(timm.__spec__.loader).__name__)
        print(type(timm.create_model('convmlp_s', num_classes=0)).__name__)
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split('\n')[:2] == [
        "['convmlp_l', 'convmlp_m', 'convmlp_s'] SourceFileLoader", 'ConvMLPClassifier']
