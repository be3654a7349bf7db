"""Inference precision (mmconvmlp.engine.inference_precision) chosen by the machine, on both
kinds of CPU and GPU (simulated), the network parts it runs in bfloat16 with post-processing
in float32, and mmcv's RoIAlign through torchvision's kernel on the CPU."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmconvmlp.engine.precision as training_precision
from mmconvmlp.config_models import build_config_model
from mmconvmlp.engine.inference_precision import (choose_inference_dtype, network_parts,
                                                  prepare_inference, run_network_in)
from mmconvmlp.engine.readable_errors import UsageError

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CPU, GPU = torch.device('cpu'), torch.device('cuda', 1)


def build(config):
    """The config's model in eval mode, initialised as training starts (no download)."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    cfg.model.backbone.init_cfg = None
    model = build_config_model(cfg)
    model.init_weights()
    return model.eval(), cfg.default_scope


@pytest.mark.parametrize('ratio, precision, dtype, words', [
    (0.4, 'auto', torch.bfloat16, 'bfloat16 (auto: a bfloat16 probe ran 2.5x as fast'),
    (12., 'auto', torch.float32, 'float32 (auto: a bfloat16 probe ran 12x slower'),
    (0.4, 'float32', torch.float32, 'float32 (--precision float32)'),
    (0.4, 'bfloat16', torch.bfloat16, 'bfloat16 (--precision bfloat16; a bfloat16 probe'),
])
def test_the_cpu_follows_the_training_probe(monkeypatch, ratio, precision, dtype, words):
    monkeypatch.setattr(training_precision, 'cpu_bfloat16_speed', lambda: ratio)
    chosen, why = choose_inference_dtype(CPU, precision)
    assert chosen == dtype and why.startswith(words), why


def test_forcing_bfloat16_on_a_cpu_that_emulates_it_warns(monkeypatch):
    monkeypatch.setattr(training_precision, 'cpu_bfloat16_speed', lambda: 40.)
    with pytest.warns(UserWarning, match='this CPU emulates bfloat16: a bfloat16 probe ran '
                                         '40x slower'):
        assert choose_inference_dtype(CPU, 'bfloat16')[0] == torch.bfloat16
    with pytest.raises(UsageError, match='float16 needs a GPU'):
        choose_inference_dtype(CPU, 'float16')


@pytest.mark.parametrize('capability, precision, dtype', [
    ((7, 5), 'auto', torch.float16), ((8, 0), 'auto', torch.bfloat16),
    ((9, 0), 'float16', torch.float16), ((8, 6), 'bfloat16', torch.bfloat16),
])
def test_a_gpu_by_its_compute_capability(monkeypatch, capability, precision, dtype):
    asked = []

    def get_device_capability(device=None):  # as torch's: the capability of that device
        asked.append(device)
        return capability
    monkeypatch.setattr(torch.cuda, 'get_device_capability', get_device_capability)
    assert choose_inference_dtype(GPU, precision)[0] == dtype
    assert asked == [GPU]  # the GPU asked about is the model's, not the current one


def test_bfloat16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla T4')
    with pytest.raises(UsageError, match='Tesla T4 has no bfloat16 units'):
        choose_inference_dtype(GPU, 'bfloat16')


@pytest.mark.parametrize('config, parts', [
    ('detection/retinanet_convmlp_s_coco.py', ['backbone', 'neck', 'bbox_head']),
    ('detection/mask_rcnn_convmlp_s_coco.py',
     ['backbone', 'neck', 'rpn_head', 'roi_head.bbox_head', 'roi_head.mask_head']),
    ('segmentation/fpn_convmlp_s_ade20k.py', ['backbone', 'neck', 'decode_head']),
])
def test_the_network_parts_of_each_kind_of_model(config, parts):
    model, _ = build(config)
    assert [name for name, _ in network_parts(model)] == parts


def test_network_in_bfloat16_post_processing_in_float32():
    """The heads' convolutions compute in bfloat16, their outputs reach post-processing in
    float32, and the detections stay those of float32 within bfloat16's rounding."""
    from mmdet.structures.bbox import bbox_overlaps
    from mmdet.testing import demo_mm_inputs
    model, scope = build('detection/retinanet_convmlp_s_coco.py')
    head = model.bbox_head
    with torch.no_grad():  # biases that let boxes through, to compare detections
        head.retina_cls.bias.fill_(0.)
    data = demo_mm_inputs(1, [[3, 96, 128]], num_items=[1])

    def predict():
        with DefaultScope.overwrite_default_scope(scope), torch.no_grad():
            return model.test_step(data)[0].pred_instances

    reference = predict()
    seen = {}
    head.retina_cls.register_forward_hook(lambda m, i, out: seen.update(conv=out.dtype))
    predict_by_feat = head.predict_by_feat

    def seen_predict_by_feat(cls_scores, *args, **kwargs):
        seen.update(post=cls_scores[0].dtype)
        return predict_by_feat(cls_scores, *args, **kwargs)
    head.predict_by_feat = seen_predict_by_feat
    assert run_network_in(model, torch.bfloat16) == ['backbone', 'neck', 'bbox_head']
    result = predict()
    assert seen == dict(conv=torch.bfloat16, post=torch.float32)
    assert result.bboxes.dtype == torch.float32 and len(result) == len(reference) == 100
    # the best box of float32 is found in bfloat16 too, within bfloat16's rounding
    ious = bbox_overlaps(reference.bboxes[:1], result.bboxes)
    assert ious.max() > 0.9
    assert torch.allclose(result.scores[:10], reference.scores[:10], rtol=0.05)


def test_a_segmentor_in_bfloat16_gives_float32_logits_close_to_float32():
    model, scope = build('segmentation/fpn_convmlp_s_ade20k.py')
    inputs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(inputs, mode='tensor')
        run_network_in(model, torch.bfloat16)
        logits = model(inputs, mode='tensor')
    assert logits.dtype == torch.float32 and not torch.equal(logits, reference)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_torchvision_roi_align_equals_mmcv_on_the_cpu(sampling_ratio):
    from mmcv.ops import RoIAlign
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 40, 56, generator=gen)
    corners = torch.rand(300, 2, 2, generator=gen) * torch.tensor([224., 160.])
    rois = torch.cat([torch.randint(0, 2, (300, 1), generator=gen).float(),
                      corners.min(1).values, corners.max(1).values], 1)
    rois[:20, 3:] = rois[:20, 1:3] + 0.3  # boxes smaller than a pixel of the map
    mmcv_layer = RoIAlign(7, spatial_scale=0.25, sampling_ratio=sampling_ratio)
    torchvision_layer = RoIAlign(7, spatial_scale=0.25, sampling_ratio=sampling_ratio,
                                 use_torchvision=True)
    given = rois.clone()
    expected = mmcv_layer(features, rois)
    result = torchvision_layer(features, rois)
    assert torch.equal(rois, given)  # the boxes are not shifted in place
    assert torch.equal(result, expected)


def test_prepare_inference_switches_mask_rcnn_roi_align_on_the_cpu(monkeypatch):
    from mmcv.ops import RoIAlign
    monkeypatch.setattr(training_precision, 'cpu_bfloat16_speed', lambda: 12.)
    model, _ = build('detection/mask_rcnn_convmlp_s_coco.py')
    line = prepare_inference(model, 'auto')
    layers = [m for m in model.modules() if isinstance(m, RoIAlign)]
    assert len(layers) == 8 and all(layer.use_torchvision for layer in layers)
    assert line == ('float32 (auto: a bfloat16 probe ran 12x slower than float32 on this '
                    'CPU, no bfloat16 units); 8 RoIAlign layers on torchvision\'s CPU kernel')
    assert network_parts(model)[0][1].forward.__func__ is type(model.backbone).forward
