"""The checks of ``tools/gpu_check.sh``, each appending a Markdown section to a report.

    python tools/gpu_check/checks.py backbone REPORT [--device cuda]
    python tools/gpu_check/checks.py steps REPORT [--device cuda] [--workdir DIR]
    python tools/gpu_check/checks.py train-speed REPORT [--device cuda] [--shape H W]

* ``backbone``: ConvMLP-S (random weights, seeded) on the device against the CPU: outputs in
  eval mode and gradients in training mode in float32 with TF32 off (relative error within
  1e-4), and outputs under autocast in the precision training would pick.
* ``steps``: one training step under ``--amp`` (float16 AMP on CUDA, as mmdet's ``--amp``;
  on the CPU each config's own precision) and one validation step of the RetinaNet, Mask R-CNN and Semantic FPN shapes configs on a
  few generated images: on CUDA this runs mmcv's CUDA NMS, RoIAlign and sigmoid focal loss.
* ``train-speed``: training img/s and peak memory of RetinaNet-ConvMLP-S against
  RetinaNet-R50 (the COCO configs, batches of 2 random images with random boxes).

A check that fails writes its error into its section and the script exits with status 1.
``--device cpu`` runs the same code on the CPU (``tools/gpu_check.sh --dry-run``).
"""
import argparse
import copy
import os
import os.path as osp
import statistics
import sys
import tempfile
import time
import traceback

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

STEP_CONFIGS = ('configs/detection/retinanet_convmlp_s_shapes.py',
                'configs/detection/mask_rcnn_convmlp_s_shapes.py',
                'configs/segmentation/fpn_convmlp_s_shapes.py')
SPEED_CONFIGS = ('configs/detection/retinanet_convmlp_s_coco.py',
                 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py')


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, both on the CPU in float32."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    if device.type != 'cuda':
        return 'n/a (CPU)'
    return f'{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB'


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype MixedPrecisionOptimWrapper's ``auto`` picks on this device."""
    from mmconvmlp.engine.precision import choose_cpu_precision, gpu_has_bfloat16
    if device.type == 'cuda':
        return torch.bfloat16 if gpu_has_bfloat16(device) else torch.float16
    dtype = choose_cpu_precision('auto')[0]
    return dtype if dtype != torch.float32 else torch.bfloat16


def check_backbone(device: torch.device) -> list:
    """Lines of the backbone section; raises AssertionError where a tolerance is missed."""
    from mmconvmlp.models import ConvMLP
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = ConvMLP(arch='s', drop_path_rate=0.)
    for module in model.modules():  # running statistics that are not the identity
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.)
    on_device = copy.deepcopy(model).to(device)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    lines, failures = [], []

    def record(what, errors, tolerance):
        worst = max(errors)
        ok = worst <= tolerance
        lines.append(f'| {what} | {worst:.2e} | {tolerance:.0e} | {"ok" if ok else "FAIL"} |')
        if not ok:
            failures.append(what)

    model.eval(), on_device.eval()
    with torch.no_grad():
        refs = model(x)
        outs = on_device(x.to(device))
        record('eval outputs, float32 (4 stages)',
               [relative_error(o, r) for o, r in zip(outs, refs)], 1e-4)
        dtype = amp_dtype(device)
        with torch.autocast(device.type, dtype=dtype):
            amp_outs = on_device(x.to(device))
        assert all(torch.isfinite(o).all() for o in amp_outs), 'non-finite outputs under AMP'
        record(f'eval outputs, {str(dtype)[6:]} autocast vs float32 CPU',
               [relative_error(o, r) for o, r in zip(amp_outs, refs)], 5e-2)
    model.train(), on_device.train()
    for net, inputs in ((model, x), (on_device, x.to(device))):
        sum(o.square().mean() for o in net(inputs)).backward()
    pairs = [(p.grad.flatten().cpu(), q.grad.flatten())
             for p, q in zip(on_device.parameters(), model.parameters()) if q.grad is not None]
    worst = max(relative_error(p, q) for p, q in pairs)  # small tensors can cancel more
    record(f'training gradients, float32, all {len(pairs)} tensors as one (the worst single '
           f'tensor: {worst:.1e})',
           [relative_error(torch.cat([p for p, _ in pairs]), torch.cat([q for _, q in pairs]))],
           1e-4)
    assert not failures, f'outside the tolerance: {", ".join(failures)}'
    return lines


def step_config(config: str, work_dir: str, device: torch.device):
    """The shapes ``config`` for one training step (a batch of 4) and one validation step
    (4 images), under ``--amp``, with no checkpoint written."""
    from mmengine.config import Config
    from mmconvmlp.engine.precision import use_amp
    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.work_dir = work_dir
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=10**6)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                        interval=10**6, save_last=False)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.log_level = 'WARNING'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].update(batch_size=4, num_workers=0, persistent_workers=False)
    if device.type == 'cuda':  # on the CPU, each config's own precision (as its demo runs)
        use_amp(cfg)
    return cfg


def check_steps(device: torch.device, workdir: str) -> list:
    from mmconvmlp.datasets import write_shapes_dataset
    from mmconvmlp.engine.runner import ConvMLPRunner
    write_shapes_dataset(osp.join(workdir, 'data', 'shapes'), num_train=4, num_val=4)
    lines, failures = [], []
    cwd = os.getcwd()
    os.chdir(workdir)  # the configs read data/shapes/...
    try:
        for config in STEP_CONFIGS:
            name = osp.basename(config)[:-3]
            try:
                reset_peak_memory(device)
                start = time.perf_counter()
                runner = ConvMLPRunner.from_cfg(
                    step_config(config, osp.join(workdir, name), device))
                runner.train()
                loss = runner.message_hub.get_scalar('train/loss').current()
                wrapper = type(runner.optim_wrapper).__name__
                cast = getattr(runner.optim_wrapper, 'cast_dtype', None)
                metrics = runner.val()
                synchronize(device)
                assert loss == loss and abs(loss) < float('inf'), f'training loss {loss}'
                shown = ', '.join(f'{k}={float(v):.3g}' for k, v in list(metrics.items())[:3])
                shown = shown or 'none: no detection passed the threshold after one step'
                lines.append(f'| {name} | {wrapper}{f" ({cast})" if cast else ""} | '
                             f'{loss:.3f} | {shown} | {time.perf_counter() - start:.1f} s | '
                             f'{peak_memory(device)} | ok |')
                del runner
            except Exception as error:  # one config failing must not hide the others
                failures.append(name)
                lines.append(f'| {name} | | | {type(error).__name__}: '
                             f'{str(error).splitlines()[0][:200] if str(error) else ""} '
                             f'| | | FAIL |')
                traceback.print_exc()
    finally:
        os.chdir(cwd)
    assert not failures, f'failed: {", ".join(failures)}'
    return lines


def train_speed(device: torch.device, shape, iterations: int) -> list:
    """Training img/s and peak memory of each of SPEED_CONFIGS, AMP as ``auto`` picks."""
    from mmdet.testing import demo_mm_inputs
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper

    from mmconvmlp.config_models import build_config_model, load_model_config
    from tools.analysis.benchmark import without_pretrained
    lines = []
    for config in SPEED_CONFIGS:
        cfg = load_model_config(config)[0]
        # initialised as training starts, nothing downloaded; one process: BatchNorm for SyncBN
        cfg.model = without_pretrained(cfg.model)
        model = build_config_model(cfg)
        model.init_weights()
        model = revert_sync_batchnorm(model).to(device).train()
        wrapper = build_optim_wrapper(model, dict(
            type='MixedPrecisionOptimWrapper',
            optimizer=dict(type='SGD', lr=1e-4, momentum=0.9)))
        batch = demo_mm_inputs(batch_size=2, image_shapes=(3, *shape), num_items=[3, 3],
                               num_classes=cfg.model.bbox_head.num_classes)
        times = []
        reset_peak_memory(device)
        for i in range(iterations + 2):  # two untimed steps first
            synchronize(device)
            start = time.perf_counter()
            losses = model.train_step(batch, wrapper)
            synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        loss = float(torch.as_tensor(losses['loss']).detach())  # the sum of the losses
        median = statistics.median(times)
        lines.append(f'| {config} | {type(wrapper).__name__} | {2 / median:.1f} | '
                     f'{median * 1000:.0f} ms ({min(times) * 1000:.0f}-'
                     f'{max(times) * 1000:.0f}) | {peak_memory(device)} | {loss:.3f} |')
        del model, wrapper
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return lines


HEADERS = {
    'backbone': ('## Backbone: {device} against the CPU',
                 '| comparison | relative error | tolerance | |', '|---|---|---|---|'),
    'steps': ('## One AMP training step and one validation step (shapes data, 4 images)',
              '| config | optimizer wrapper | loss | metrics | time | peak memory | |',
              '|---|---|---|---|---|---|---|'),
    'train-speed': ('## Training speed, batches of 2 at {shape}',
                    '| config | wrapper | img/s | median step (min-max) | peak memory | loss |',
                    '|---|---|---|---|---|---|'),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('check', choices=sorted(HEADERS))
    parser.add_argument('report', help='Markdown file to append the section to')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--workdir', help='scratch folder of the steps (default: a temporary one)')
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'))
    parser.add_argument('--iterations', type=int, default=10, help='timed training steps')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    title, *table = HEADERS[args.check]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (dry run)'
    section = [title.format(device=name, shape=f'{args.shape[0]}x{args.shape[1]}'), '', *table]
    status = 0
    try:
        if args.check == 'backbone':
            section += check_backbone(device)
        elif args.check == 'steps':
            with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
                section += check_steps(device, workdir)
        else:
            section += train_speed(device, args.shape, args.iterations)
    except Exception as error:
        traceback.print_exc()
        section += ['', f'**FAILED**: {type(error).__name__}: {error}']
        status = 1
    with open(args.report, 'a') as f:
        f.write('\n'.join(section) + '\n\n')
    print('\n'.join(section))
    return status


if __name__ == '__main__':
    sys.exit(main())
