"""Inference speed and memory of whole mmdet detectors and mmseg segmentors, built from their
configs, on synthetic images: no data needed.

    python tools/analysis/benchmark.py CONFIG [CONFIG ...] [--shape H W] [--batch N]
        [--repeats N] [--precision auto|float32|bfloat16|float16] [--checkpoint FILE]
        [--compile] [--device D]

    python tools/analysis/benchmark.py configs/detection/retinanet_convmlp_s_coco.py \\
        mmdet::retinanet/retinanet_r50_fpn_1x_coco.py --shape 800 1216 --repeats 3

A CONFIG is a file, or a config of an installed package named as in ``_base_``
(``mmdet::retinanet/retinanet_r50_fpn_1x_coco.py``, ``mmseg::sem_fpn/...``). What is timed is
``model.test_step`` on a batch of random uint8 images: the data preprocessor (normalisation,
padding), backbone, neck, head and post-processing (box decoding and NMS, mask pasting,
resizing of segmentation logits), all of inference but reading and resizing the images.

The weights are those training starts from: the model is built and ``init_weights`` runs,
with every pretrained checkpoint of the config (``init_cfg`` Pretrained, mmseg's
``pretrained``) left out, so nothing is downloaded and the backbone is random. The heads get
their initial biases, so as few boxes pass the score threshold as in a trained model, not
almost every anchor. ``--checkpoint FILE`` (one CONFIG) times a trained model instead. The
network's work does not depend on the weights; post-processing does, through how many boxes
pass the score threshold, which the ``boxes/img`` column gives (kept boxes, after NMS).

``--precision`` (default ``auto``) is that of ``tools/infer.py``
(:func:`mmconvmlp.engine.inference_precision.prepare_inference`): bfloat16 on CPUs with
bfloat16 units and GPUs with compute capability 8.0+, float16 on older GPUs, float32
elsewhere; backbone, neck and heads in it, post-processing in float32; on the CPU mmcv's
RoIAlign runs torchvision's kernel. The header says what was chosen and why.

Each config's model in each precision gets one untimed run, then ``--repeats`` timed ones,
the precisions in turn (a model per precision, run alternately, so a busier moment of the
machine hits them alike). A row gives the median latency per batch with the fastest and
slowest run, ``img/s`` (batch / median latency), the peak memory during the untimed run (on
the CPU the process's peak resident set size: model, inputs and Python included, and the
config's models in the precisions before; on CUDA ``torch.cuda.max_memory_allocated``), the
boxes a detector kept per image and, with several precisions, the median and range over the
rounds of the first precision's time over this one's.
``--compile`` compiles the backbone with ``torch.compile``: a ConvMLP through its
``compile=True``, any other backbone with :func:`mmconvmlp.models.compiled.compile_forward`;
the untimed run compiles, and its time (``first run s``) is reported apart.
"""
import argparse
import copy
import functools
import gc
import logging
import os.path as osp
import re
import statistics
import sys
import time
import warnings
from typing import Callable, List, Optional, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mmconvmlp.config_models import build_config_model, load_model_config  # noqa: E402
from mmconvmlp.engine.readable_errors import ReadableError, UsageError, first_line  # noqa: E402
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


def compile_backbone_cfg(cfg) -> bool:
    """Set ``compile=True`` on a ConvMLP backbone in ``cfg`` (an mmengine Config); False
    where the backbone is of another type."""
    backbone = cfg.model.get('backbone')
    if backbone is None or backbone.get('type') not in ('ConvMLP', 'mmconvmlp.ConvMLP'):
        return False
    backbone['compile'] = True
    return True


def without_pretrained(node):
    """A copy of a model config (dicts and lists within) without the checkpoints it would
    load in ``init_weights``: ``init_cfg`` entries of type Pretrained and string
    ``pretrained`` keys (mmseg's ``model.pretrained``, older backbones') are dropped."""
    if isinstance(node, (list, tuple)):
        return type(node)(without_pretrained(item) for item in node)
    if not isinstance(node, dict):
        return node
    copy = type(node)()
    for key, value in node.items():
        if key == 'pretrained' and isinstance(value, str):
            continue
        if key == 'init_cfg':
            entries = value if isinstance(value, (list, tuple)) else [value]
            entries = [e for e in entries if not (isinstance(e, dict)
                                                  and e.get('type') == 'Pretrained')]
            if not entries:
                continue
            value = entries if isinstance(value, (list, tuple)) else entries[0]
        copy[key] = without_pretrained(value)
    return copy


def build_model(cfg, device: torch.device, checkpoint: Optional[str] = None
                ) -> torch.nn.Module:
    """The config's model on ``device`` in eval mode, initialised as training starts
    (``init_weights`` without pretrained checkpoints: nothing is downloaded), then given the
    weights of ``checkpoint`` where one is named (it must fit the model). SyncBN layers become
    plain BatchNorm (the same in eval mode, and no process group)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.runner import CheckpointLoader, load_state_dict

    from mmconvmlp.engine.weights_fit import check_weights_fit
    cfg.model = without_pretrained(cfg.model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation notes of stock models' arguments
        model = build_config_model(cfg)
        model.init_weights()
    if checkpoint is not None:
        loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
        check_weights_fit(model, loaded, checkpoint)
        state = loaded.get('state_dict', loaded)
        load_state_dict(model, {k[len('module.'):] if k.startswith('module.') else k: v
                                for k, v in state.items()})
    return revert_sync_batchnorm(model).to(device).eval()


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits until ``device`` has done its queued work: CUDA's synchronize of that
    very GPU (the current one may be another), nothing on the CPU."""
    if device.type == 'cuda':
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


def kept_boxes(outputs) -> Optional[float]:
    """Boxes per image a detector kept (passing its score threshold and NMS); None for
    segmentors."""
    counts = [len(sample.pred_instances) for sample in outputs
              if 'pred_instances' in sample]
    return sum(counts) / len(counts) if counts else None


class Model:
    """One config's model set up in one precision, with the figures of its runs."""

    def __init__(self, name: str, cfg, scope: str, device: torch.device, precision: str,
                 checkpoint: Optional[str], compile: bool):
        from mmconvmlp.engine.inference_precision import prepare_inference
        from mmconvmlp.models.compiled import compile_forward
        self.name, self.scope, self.precision = name, scope, precision
        cfg = copy.deepcopy(cfg)
        compiled_by_cfg = compile and compile_backbone_cfg(cfg)
        self.model = build_model(cfg, device, checkpoint)
        if compile and not compiled_by_cfg:
            compile_forward(self.model.backbone)
        self.how = prepare_inference(self.model, precision, device)
        self.sync = device_sync(device)
        self.outputs, self.times = [], []

    def run(self, data: dict) -> float:
        """Seconds of one ``test_step`` on ``data``, to the device's end of the work."""
        from mmengine.registry import DefaultScope
        start = time.perf_counter()
        try:
            with DefaultScope.overwrite_default_scope(self.scope), torch.no_grad():
                self.outputs = self.model.test_step(data)
            self.sync()
        except Exception as error:  # any failure inside the model, told in one line
            shape = 'x'.join(map(str, data['inputs'][0].shape))
            raise InferenceError(f'{self.name}: inference on {len(data["inputs"])}x{shape} '
                                 f'failed: {type(error).__name__}: {first_line(error)}'
                                 ) from error
        return time.perf_counter() - start


def benchmark(name: str, cfg, scope: str, device: torch.device, shape: Tuple[int, int],
              batch: int, repeats: int, precisions: List[str], memory: PeakMemory,
              compile: bool = False, checkpoint: Optional[str] = None) -> List[dict]:
    """Build the config's model once per precision and time ``test_step``: one untimed
    run each (the peak memory is taken there), then ``repeats`` rounds of one run of each
    in turn. Returns the figures of each precision's row, with the speed-up of each round
    over the first precision's run of that round."""
    data = synthetic_batch(scope, batch, *shape)
    models = []
    for precision in precisions:
        memory.reset()
        model = Model(name, cfg, scope, device, precision, checkpoint, compile)
        model.first = model.run(data)
        model.memory_mb = memory.peak_mb()
        models.append(model)
    for _ in range(repeats):
        for model in models:
            model.times.append(model.run(data))
    rows = []
    for model in models:
        median = statistics.median(model.times)
        ratios = sorted(a / b for a, b in zip(models[0].times, model.times))
        rows.append(dict(config=osp.basename(name), precision=model.how,
                         img_per_s=batch / median, median_ms=median * 1e3,
                         min_ms=min(model.times) * 1e3, max_ms=max(model.times) * 1e3,
                         memory_mb=model.memory_mb, first_s=model.first,
                         boxes=kept_boxes(model.outputs), speedup=statistics.median(ratios),
                         speedup_range=(ratios[0], ratios[-1])))
    return rows


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
    if args.checkpoint is not None:
        if len(args.configs) != 1:
            raise UsageError(f'--checkpoint {args.checkpoint}: give one CONFIG, the '
                             f'checkpoint\'s, not {len(args.configs)}.')
        if not osp.isfile(args.checkpoint):
            raise UsageError(f'--checkpoint {args.checkpoint}: no such file.')


def parse_args(argv=None):
    from mmconvmlp.engine.inference_precision import PRECISIONS
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
    parser.add_argument('--precision', nargs='+', choices=PRECISIONS, default=['auto'],
                        help='auto (default: bfloat16 where the CPU or GPU has bfloat16 '
                             'units, float16 on older GPUs, else float32), float32, '
                             'bfloat16 or float16; several: each config in each, timed in '
                             'turn, with the speed-up over the first')
    parser.add_argument('--checkpoint', help='weights of a trained model (one CONFIG); by '
                        'default the weights training starts from, without downloads')
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
        from mmconvmlp.engine.inference_precision import choose_inference_dtype
        configs = [(name, *load_model_config(name)) for name in args.configs]
        for precision in args.precision:
            choose_inference_dtype(device, precision)  # a precision the device cannot run
        memory = PeakMemory(device)
        height, width = args.shape
        weights = (f'weights of {args.checkpoint}' if args.checkpoint else
                   'weights as training starts (init_weights, no pretrained checkpoint '
                   'loaded or downloaded)')
        compile_note = ('; backbone compiled (torch.compile, static sizes); the first run '
                        'compiles' if args.compile else '')
        print(f'Inference of the whole model (model.test_step: preprocessing, backbone, neck, '
              f'head, post-processing) on {args.batch}x3x{height}x{width} synthetic images, '
              f'{weights}; median of {args.repeats} runs after an untimed one'
              f'{", the precisions in turn" if len(args.precision) > 1 else ""}'
              f'{compile_note}.\ndevice: {device}, {describe_device(device)}\n')
        several = len(args.precision) > 1
        extra = (' speed-up, median (min-max) |' if several else '') + \
            (' first run s |' if args.compile else '')
        print(f'| config | precision | img/s | latency ms, median (min-max) | '
              f'{memory.kind} MB | boxes/img |{extra}')
        print('|---' * (6 + several + args.compile) + '|')
        failures = []
        for name, cfg, scope in configs:
            try:
                rows = benchmark(name, cfg, scope, device, (height, width), args.batch,
                                 args.repeats, args.precision, memory, args.compile,
                                 args.checkpoint)
            except (InferenceError, ReadableError) as error:
                failures.append(str(error))
                print(f'| {osp.basename(name)} | failed, see below |' + ' - |' * (
                    4 + several + args.compile), flush=True)
                continue
            for row in rows:
                boxes = '-' if row['boxes'] is None else f'{row["boxes"]:.1f}'
                cells = [row['config'], row['precision'], f'{row["img_per_s"]:.2f}',
                         f'{row["median_ms"]:.0f} ({row["min_ms"]:.0f}-{row["max_ms"]:.0f})',
                         f'{row["memory_mb"]:.0f}', boxes]
                if several:
                    low, high = row['speedup_range']
                    cells.append(f'{row["speedup"]:.2f}x ({low:.2f}-{high:.2f})')
                if args.compile:
                    cells.append(f'{row["first_s"]:.1f}')
                print('| ' + ' | '.join(cells) + ' |', flush=True)
        if failures:
            raise UsageError(' / '.join(failures))
    except ReadableError as error:
        sys.exit(f'benchmark.py: error: {error}')


if __name__ == '__main__':
    main()
