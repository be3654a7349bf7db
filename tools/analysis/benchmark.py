"""Inference speed and memory of whole mmdet detectors and mmseg segmentors, built from their
configs, on synthetic images: no weights and no data needed.

    python tools/analysis/benchmark.py CONFIG [CONFIG ...] [--shape H W] [--batch N]
        [--repeats N] [--amp] [--compile] [--device D]

    python tools/analysis/benchmark.py configs/detection/retinanet_convmlp_s_coco.py \\
        mmdet::retinanet/retinanet_r50_fpn_1x_coco.py --shape 800 1216 --repeats 3

A CONFIG is a file, or a config of an installed package named as in ``_base_``
(``mmdet::retinanet/retinanet_r50_fpn_1x_coco.py``, ``mmseg::sem_fpn/...``). What is timed is
``model.test_step`` on a batch of random uint8 images: the data preprocessor (normalisation,
padding), backbone, neck, head and post-processing (box decoding and NMS, mask pasting,
resizing of segmentation logits), all of inference but reading and resizing the images.

The models have random weights: they are built from their configs and ``init_weights`` is
never called, so nothing is downloaded or loaded (stock configs name pretrained ImageNet
backbones, and those are not fetched). The network's work does not depend on the weights;
post-processing does a little, through how many boxes pass the score threshold.

Each config gets one untimed run, then ``--repeats`` timed ones. A row gives the median
latency per batch with the fastest and slowest run, ``img/s`` (batch / median latency) and
the peak memory: on the CPU the process's peak resident set size during that config's runs
(model, inputs and Python included), on CUDA ``torch.cuda.max_memory_allocated``.
``--amp``: float16 autocast on CUDA; on the CPU bfloat16 autocast of the backbone and neck
where this CPU runs it fast (:func:`mmconvmlp.engine.precision.cpu_bfloat16_speed`), else
float32, as the header says (the heads stay float32 there: mmcv's CPU ops have no bfloat16
kernels). ``--compile`` compiles the backbone with ``torch.compile``: a ConvMLP through its
``compile=True``, any other backbone with :func:`mmconvmlp.models.compiled.compile_forward`;
the untimed run compiles, and its time (``first run s``) is reported apart.
"""
import argparse
import gc
import logging
import os.path as osp
import re
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable, List, Optional, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mmconvmlp.config_models import build_eval_model, load_model_config  # noqa: E402
from mmconvmlp.engine.readable_errors import UsageError, first_line  # noqa: E402
from mmconvmlp.machine import describe_device  # noqa: E402

#: Smallest image side: every model here downsamples by 32 and pads to a multiple of it.
MIN_SIDE = 32


class InferenceError(UsageError):
    """A model that fails to run; the other configs are still timed."""


def synthetic_batch(scope: str, batch: int, height: int, width: int) -> dict:
    """What a test data loader gives ``test_step``: random uint8 (3, H, W) images and data
    samples whose metainfo says they were not resized, flipped or padded."""
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    gen = torch.Generator().manual_seed(0)
    shape = (height, width)
    meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, scale_factor=(1., 1.))
    return dict(inputs=[torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                      generator=gen) for _ in range(batch)],
                data_samples=[Sample(metainfo=dict(meta)) for _ in range(batch)])


class PeakMemory:
    """Peak memory from :meth:`reset` to :meth:`peak_mb`: on CUDA the allocator's peak, on
    the CPU the process's peak resident set size (Linux resets it through
    ``/proc/self/clear_refs``; elsewhere it counts from the start of the process, as the
    ``kind`` says)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == 'cuda':
            self.kind = 'max_memory_allocated'
        elif self._reset_cpu_peak():
            self.kind = 'peak RSS'
        else:
            self.kind = 'peak RSS since the process started'

    @staticmethod
    def _reset_cpu_peak() -> bool:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset the high-water mark VmHWM to the current RSS
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            self._reset_cpu_peak()

    def peak_mb(self) -> float:
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open('/proc/self/status') as f:
                return int(re.search(r'VmHWM:\s+(\d+) kB', f.read()).group(1)) / 1024
        except (OSError, AttributeError):
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak / 2**20 if sys.platform == 'darwin' else peak / 1024


def choose_precision(device: torch.device, amp: bool) -> Tuple[Optional[torch.dtype], str]:
    """(autocast dtype or None, what the header says about it)."""
    if not amp:
        return None, 'float32'
    if device.type == 'cuda':
        return torch.float16, 'float16 autocast (--amp)'
    if device.type != 'cpu':
        raise UsageError(f'--amp is for cuda and cpu devices, not {device.type}.')
    from mmconvmlp.engine.precision import cpu_bfloat16_speed
    ratio = cpu_bfloat16_speed()
    if ratio < 1:
        return torch.bfloat16, (f'bfloat16 autocast in backbone and neck, float32 heads '
                                f'(--amp; a bfloat16 probe ran {1 / ratio:.1f}x as fast as '
                                f'float32 here; mmcv\'s CPU ops have no bfloat16 kernels)')
    return None, (f'float32: --amp asked for bfloat16, but a bfloat16 probe ran {ratio:.0f}x '
                  f'slower than float32 on this CPU (no bfloat16 units), so it stays float32')


def autocast_features(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run ``model.extract_feat`` (backbone and neck) under CPU autocast to ``dtype`` and
    hand its maps on in float32: the heads' mmcv ops (NMS, RoIAlign) have no bfloat16 CPU
    kernels."""
    extract_feat = model.extract_feat

    def extract_feat_autocast(inputs: torch.Tensor):
        with torch.autocast('cpu', dtype=dtype):
            return tuple(feature.float() for feature in extract_feat(inputs))

    model.extract_feat = extract_feat_autocast


def time_runs(run: Callable[[], object], repeats: int, sync: Callable[[], None]
              ) -> Tuple[float, List[float]]:
    """Seconds of one untimed first call of ``run`` (where a compiled model compiles), and of
    each of ``repeats`` calls after it."""
    start = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return first, times


def compile_backbone_cfg(cfg) -> bool:
    """Set ``compile=True`` on a ConvMLP backbone in ``cfg`` (an mmengine Config); False
    where the backbone is of another type."""
    backbone = cfg.model.get('backbone')
    if backbone is None or backbone.get('type') not in ('ConvMLP', 'mmconvmlp.ConvMLP'):
        return False
    backbone['compile'] = True
    return True


def benchmark(name: str, cfg, scope: str, device: torch.device, shape: Tuple[int, int],
              batch: int, repeats: int, dtype: Optional[torch.dtype], memory: PeakMemory,
              compile: bool = False) -> dict:
    """Build one model and time ``test_step``; returns the figures of its row."""
    from mmengine.registry import DefaultScope

    from mmconvmlp.models.compiled import compile_forward
    compiled_by_cfg = compile and compile_backbone_cfg(cfg)
    model = build_eval_model(cfg, device)
    if compile and not compiled_by_cfg:
        compile_forward(model.backbone)
    data = synthetic_batch(scope, batch, *shape)
    autocast = nullcontext()
    if dtype == torch.bfloat16:
        autocast_features(model, dtype)
    elif dtype is not None:
        autocast = torch.autocast(device.type, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def run():
        with DefaultScope.overwrite_default_scope(scope), torch.no_grad(), autocast:
            return model.test_step(data)

    memory.reset()
    try:
        first, times = time_runs(run, repeats, sync)
    except Exception as error:  # any failure inside the model, told in one line
        raise InferenceError(f'{name}: inference on {batch}x3x{shape[0]}x{shape[1]} failed: '
                             f'{type(error).__name__}: {first_line(error)}') from error
    peak = memory.peak_mb()
    del model, data
    median = statistics.median(times)
    return dict(config=osp.basename(name), img_per_s=batch / median, median_ms=median * 1e3,
                min_ms=min(times) * 1e3, max_ms=max(times) * 1e3, memory_mb=peak,
                first_s=first)


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise UsageError(f'--device {text!r} is not a device: {error}') from error
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {text}: CUDA is not available here; use --device cpu.')
    if device.type not in ('cpu', 'cuda'):
        raise UsageError(f'--device {text}: only cpu and cuda devices are supported.')
    return device


def check_args(args) -> None:
    height, width = args.shape
    if height < MIN_SIDE or width < MIN_SIDE:
        raise UsageError(f'--shape {height} {width}: height and width must be at least '
                         f'{MIN_SIDE} pixels.')
    if args.batch < 1 or args.repeats < 1:
        raise UsageError(f'--batch {args.batch} --repeats {args.repeats}: both must be at '
                         f'least 1.')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Time whole-model inference (preprocessing, backbone, neck, head, '
                    'post-processing) of mmdet/mmseg configs on synthetic images.')
    parser.add_argument('configs', nargs='+', metavar='CONFIG',
                        help='config files, or mmdet::/mmseg:: names of stock configs')
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1216),
                        metavar=('H', 'W'), help='image height and width (default 800 1216)')
    parser.add_argument('--batch', type=int, default=1, help='images per batch (default 1)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed runs per config, after one untimed run (default 5)')
    parser.add_argument('--amp', action='store_true',
                        help='float16 autocast on CUDA; bfloat16 on a CPU that runs it fast')
    parser.add_argument('--compile', action='store_true',
                        help='compile the backbone with torch.compile (timed after the '
                             'untimed first run, which compiles)')
    parser.add_argument('--device', default='cpu', help='cpu (default), cuda or cuda:N')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.getLogger('mmengine').setLevel(logging.ERROR)
    try:
        check_args(args)
        device = parse_device(args.device)
        import mmconvmlp  # noqa: F401  (registers ConvMLP for configs that lack custom_imports)
        configs = [(name, *load_model_config(name)) for name in args.configs]
        dtype, precision = choose_precision(device, args.amp)
        memory = PeakMemory(device)
        height, width = args.shape
        compile_note = ('; backbone compiled (torch.compile, static sizes); the first run '
                        'compiles' if args.compile else '')
        print(f'Inference of the whole model (model.test_step: preprocessing, backbone, neck, '
              f'head, post-processing) on {args.batch}x3x{height}x{width} synthetic images, '
              f'random weights (no checkpoint loaded or downloaded); median of '
              f'{args.repeats} runs after an untimed one.\n'
              f'device: {device}, {describe_device(device)}\nprecision: {precision}'
              f'{compile_note}\n')
        first_run = ' first run s |' if args.compile else ''
        print(f'| config | img/s | latency ms, median (min-max) | {memory.kind} MB |{first_run}')
        print('|---|---|---|---|' + ('---|' if first_run else ''))
        failures = []
        for name, cfg, scope in configs:
            try:
                row = benchmark(name, cfg, scope, device, (height, width), args.batch,
                                args.repeats, dtype, memory, args.compile)
            except InferenceError as error:
                failures.append(str(error))
                print(f'| {osp.basename(name)} | failed, see below | - | - |'
                      f'{" - |" if first_run else ""}', flush=True)
                continue
            compile_time = f' {row["first_s"]:.1f} |' if first_run else ''
            print(f'| {row["config"]} | {row["img_per_s"]:.2f} | {row["median_ms"]:.0f} '
                  f'({row["min_ms"]:.0f}-{row["max_ms"]:.0f}) | {row["memory_mb"]:.0f} |'
                  f'{compile_time}', flush=True)
        if failures:
            raise UsageError(' / '.join(failures))
    except UsageError as error:
        sys.exit(f'benchmark.py: error: {error}')


if __name__ == '__main__':
    main()
