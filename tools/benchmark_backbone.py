"""Time the ConvMLP backbone against the machine's limit and against the authors' layout.

For each case the script prints, measured in the same run:

* the practical peak of the machine in the case's precision: the best GFLOP/s of a
  2048x2048x2048 ``torch.mm`` and of a 3x3 convolution of 256 channels on 1x256x80x80
  (channels-last memory), the densest kernels PyTorch has;
* for each model, the median time, the GFLOP/s it achieves (2 x the multiply-accumulates
  that mmengine's ``FlopAnalyzer`` counts for the backbone; a training step counts as 3
  forward passes) and that as a fraction of the peak;
* the speed-up over the authors' layout (with the quartiles of the speed-ups of runs paired
  in turn, so drift on a shared machine shows as a range) and how far the outputs differ;
* the project's goal for the case (:data:`GOALS`: inference at 90% of the float32 peak and
  85% of the bfloat16 one, a training step at 85% and 80%) and whether each model meets it.

The models, all holding the same weights: ``authors' layout`` (``mmconvmlp.testing``: a
plain implementation with channels-first convolutions and a permute around every depthwise
and downsampling convolution), ``mmconvmlp plain`` (the network as
``mmconvmlp.models.convmlp`` writes it, which tracers and exporters see) and ``mmconvmlp``
(with the CPU layers of ``mmconvmlp.models.cpu_speed``, as the tools run it). They take
turns in short blocks (see ``time_interleaved``).

    python tools/benchmark_backbone.py                  # ConvMLP-S, the cases below
    python tools/benchmark_backbone.py --threads 1 --cpu-time
    python tools/benchmark_backbone.py --dtype bfloat16 # under bfloat16 autocast
    python tools/benchmark_backbone.py --arch l --repeats 10 --device cuda

Cases: inference on 1x3x800x1216 and 1x3x640x640 (eval mode, no gradients), and a training
step (forward, backward) on 2x3x384x384 and 2x3x512x512 with BatchNorm in training mode;
``--norm-eval`` adds the step with frozen BatchNorm statistics. ``--infer-input`` and
``--train-input`` time other sizes (none: ``--train-input`` with no value).

The header names the machine: the CPU's model, its instruction-set flags that matter here
(AVX2, AVX-512, AVX512-BF16, AMX), the instruction set PyTorch's kernels use with any limit
set in the environment (``ONEDNN_MAX_CPU_ISA`` and others), whether bfloat16 runs natively,
and where convolution weight gradients are computed in training.

``--profile`` adds, per case and model, where one run's time goes (torch.profiler, self
time): the dense kernels (matrix products and convolutions, forward and backward) against
the rest (normalisation, activations, sums, copies, layout changes), the rest's largest ops,
and what the rest amounts to at the memory bandwidth measured in the same run (a large
copy's GB/s): how many bytes it could have moved in that time.

``--compile`` adds mmconvmlp with ``compile=True`` (its label gives the seconds of its
first, compiling call). ``--bounds`` adds training-step rows for mmconvmlp with BatchNorm
(and then ReLU, LayerNorm and GELU) replaced by identities: not models, but bounds on what
the step could cost if those layers were free. ``--cpu-time`` times by this thread's CPU
time instead of the wall clock (use with ``--threads 1``: all the work runs on that thread,
and other processes disturb it far less).
"""
import argparse
import contextlib
import copy
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mmconvmlp.engine.precision import cpu_bfloat16_speed
from mmconvmlp.machine import describe_device
from mmconvmlp.models import ConvMLP, accelerate_for_cpu
from mmconvmlp.models.cpu_speed import weight_grads
from mmconvmlp.testing import ReferenceConvMLP

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
#: The project's goals, as a fraction of the practical peak in the same precision:
#: (case, dtype) -> percent. Rows of a case compare each model with its goal.
GOALS = {('inference', 'float32'): 90, ('train step', 'float32'): 85,
         ('inference', 'bfloat16'): 85, ('train step', 'bfloat16'): 80}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='s', choices=['s', 'm', 'l'])
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per case and model')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s own choice)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--infer-input', type=input_shape, nargs='*',
                        default=[(1, 3, 800, 1216), (1, 3, 640, 640)],
                        help='inputs of the inference cases, BxCxHxW each')
    parser.add_argument('--train-input', type=input_shape, nargs='*',
                        default=[(2, 3, 384, 384), (2, 3, 512, 512)],
                        help='inputs of the training-step cases, BxCxHxW each')
    parser.add_argument('--norm-eval', action='store_true',
                        help='also time training steps with frozen BatchNorm statistics')
    parser.add_argument('--dtype', default='float32', choices=list(DTYPES),
                        help='float32, or bfloat16 autocast (refused on a CPU that emulates '
                             'bfloat16, unless --force)')
    parser.add_argument('--force', action='store_true',
                        help='time bfloat16 even where the CPU emulates it')
    parser.add_argument('--weight-grad', default='auto',
                        choices=weight_grads.WEIGHT_GRAD_LAYOUTS,
                        help='where mmconvmlp computes convolution weight gradients on the CPU '
                             '(default: measured, see mmconvmlp.models.cpu_speed)')
    parser.add_argument('--compile', action='store_true',
                        help='also time mmconvmlp with compile=True (torch.compile)')
    parser.add_argument('--cpu-time', action='store_true',
                        help='time by this thread\'s CPU time (use with --threads 1)')
    parser.add_argument('--profile', action='store_true',
                        help='also split each model\'s time between dense kernels and the rest')
    parser.add_argument('--bounds', action='store_true',
                        help='also time training steps with BatchNorm (and then ReLU, '
                             'LayerNorm, GELU) replaced by identities')
    return parser.parse_args()


def input_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.lower().split('x'))
    except ValueError:
        shape = ()
    if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not an input shape: give BxCxHxW with 3 channels, e.g. 2x3x512x512')
    return shape


#: Layer types whose removal the ``--bounds`` rows time, row by row.
BOUNDS = (('bound: no BatchNorm', (torch.nn.BatchNorm2d,)),
          ('bound: no BN/ReLU/LN/GELU', (torch.nn.BatchNorm2d, torch.nn.ReLU,
                                         torch.nn.LayerNorm, torch.nn.GELU)))


def without(model: torch.nn.Module, layer_types: Tuple[type, ...]) -> torch.nn.Module:
    """A copy of ``model`` with every layer of ``layer_types`` replaced by an identity."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, layer_types):
                setattr(parent, name, torch.nn.Identity())
    return model


def machine_header(device: torch.device) -> str:
    """What the timings were taken on: the device and, on a CPU, where mmconvmlp computes
    convolution weight gradients."""
    if device.type == 'cuda':
        return describe_device(device)
    return (f'{describe_device(device)}\n'
            f'conv weight gradients (training): {weight_grads.weight_grad_layout()}')


def precision_context(args: argparse.Namespace, device: torch.device
                      ) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``--dtype bfloat16``; exits with a message where the CPU
    emulates bfloat16 and ``--force`` is not given."""
    if args.dtype == 'float32':
        return contextlib.nullcontext()
    if device.type == 'cpu' and cpu_bfloat16_speed() >= 1 and not args.force:
        sys.exit(f'--dtype bfloat16: this CPU emulates bfloat16 (a probe ran '
                 f'{cpu_bfloat16_speed():.0f}x slower than float32), so the timings would '
                 f'only show the emulation. Time float32, or add --force.')
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns: Sequence[Callable[[], object]], repeats: int, device: torch.device,
                     block: int = 3, clock: Callable[[], float] = time.perf_counter
                     ) -> List[List[float]]:
    """Seconds of ``repeats`` runs of each function. The functions take turns in blocks of
    ``block`` timed runs, each block after one untimed run: drift on the machine hits all of
    them alike, and each is timed the way a training or inference loop runs it, after a run
    of its own (a step right after another model's meets a heap laid out for that model and
    pays for fresh pages that a loop of its own would reuse). The first untimed run also
    takes the one-off costs of a first call. ``clock`` gives the time in seconds."""
    times: List[List[float]] = [[] for _ in fns]
    while len(times[0]) < repeats:
        runs = min(block, repeats - len(times[0]))
        for fn, bucket in zip(fns, times):
            fn()
            for _ in range(runs):
                synchronize(device)
                start = clock()
                fn()
                synchronize(device)
                bucket.append(clock() - start)
    return times


# -- the machine's practical peak ------------------------------------------------------------

def dense_kernels(dtype: torch.dtype, device: torch.device
                  ) -> Dict[str, Tuple[Callable[[], object], float]]:
    """The densest kernels PyTorch offers, each as (function, floating-point operations of
    one call): a 2048^3 matrix product and a 3x3 convolution of 256 channels at 80x80."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2048, 2048, generator=gen).to(device, dtype) for _ in range(2))
    x = torch.randn(1, 256, 80, 80, generator=gen).to(device, dtype).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, generator=gen).to(device, dtype).contiguous(
        memory_format=torch.channels_last)
    conv = torch.nn.functional.conv2d
    return {'mm 2048^3': (lambda: torch.mm(a, b), 2. * 2048 ** 3),
            'conv3x3 256ch 80x80': (lambda: conv(x, w, padding=1), 2. * 256 * 256 * 9 * 80 * 80)}


def practical_peak(dtype: torch.dtype, device: torch.device, repeats: int,
                   clock: Callable[[], float]) -> Tuple[float, Dict[str, float]]:
    """The best GFLOP/s of :func:`dense_kernels` (best time of ``repeats`` runs each), and
    each kernel's GFLOP/s."""
    kernels = dense_kernels(dtype, device)
    times = time_interleaved([fn for fn, _ in kernels.values()], repeats, device, clock=clock)
    rates = {name: flop / min(t) / 1e9 for (name, (_, flop)), t in zip(kernels.items(), times)}
    return max(rates.values()), rates


def backbone_flop(model: torch.nn.Module, x: torch.Tensor) -> float:
    """2 x the multiply-accumulates of one forward pass, counted by mmengine's
    ``FlopAnalyzer`` (convolutions, matrix products and normalizations; element-wise
    operations count nothing)."""
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(model, (x,))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return 2. * analyzer.total()


def copy_bandwidth(device: torch.device, repeats: int, clock: Callable[[], float]) -> float:
    """GB/s of a 256 MB copy (read and write counted), best of ``repeats``."""
    src = torch.empty(32 << 20, device=device).fill_(1.)
    dst = torch.empty_like(src)
    (times,) = time_interleaved([lambda: dst.copy_(src)], repeats, device, clock=clock)
    return 2 * src.numel() * src.element_size() / min(times) / 1e9


#: Self-time names of the matrix products in torch.profiler (PyTorch's and oneDNN's); an op
#: with ``conv`` in its name is a convolution, forward or backward.
MATRIX_PRODUCTS = ('mm', 'addmm', 'bmm', 'matmul', 'linear', '_linear_pointwise',
                   'mkldnn_linear')


def is_dense(op: str) -> bool:
    name = op.split('::')[-1]
    return name in MATRIX_PRODUCTS or 'conv' in name


def profile_split(fn: Callable[[], object], bandwidth: float) -> str:
    """One run of ``fn`` under torch.profiler: dense-kernel and other self time, the other
    ops with most time, and the bytes the others' time would move at ``bandwidth``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    dense = sum(e.self_cpu_time_total for e in events if is_dense(e.key)) / 1e3
    rest_events = sorted((e for e in events if not is_dense(e.key)),
                         key=lambda e: -e.self_cpu_time_total)
    rest = sum(e.self_cpu_time_total for e in rest_events) / 1e3
    top = ', '.join(f'{e.key} {e.self_cpu_time_total / 1e3:.0f}' for e in rest_events[:6])
    return (f'dense kernels {dense:.0f} ms, the rest {rest:.0f} ms ({100 * rest / (dense + rest):.0f}%,'
            f' {rest * bandwidth / 1e3:.1f} GB at {bandwidth:.0f} GB/s): {top}')


# -- one case --------------------------------------------------------------------------------

def relative_difference(outs, refs) -> float:
    return max(((o.float() - r.float()).norm() / r.float().norm()).item()
               for o, r in zip(outs, refs))


def case_rows(case: str, x: torch.Tensor, labels: List[str], fns: List[Callable[[], object]],
              flop: float, peak: float, args, device, clock,
              diffs: Optional[List[str]] = None, profiles: Optional[List[str]] = None,
              bandwidth: float = 0., goal: Optional[int] = None) -> List[Tuple[str, ...]]:
    """One row per model of a case: the first model (the authors' layout) is the
    yardstick of the speed-ups; ``goal`` the percent of the peak each row is held to. With
    ``profiles``, a line per model is added to it."""
    times = time_interleaved(fns, args.repeats, device, clock=clock)
    shape = 'x'.join(map(str, x.shape))
    if profiles is not None:
        profiles += [f'{case.strip()} {shape}, {label}: {profile_split(fn, bandwidth)}'
                     for label, fn in zip(labels, fns)]
    rows = []
    for n, (label, model_times) in enumerate(zip(labels, times)):
        median = statistics.median(model_times)
        rate = flop / median / 1e9
        ratios = [r / o for r, o in zip(times[0], model_times)]
        spread = ''
        if n and len(ratios) >= 4:
            low, _, high = statistics.quantiles(ratios, n=4)
            spread = f' ({low:.2f}-{high:.2f})'
        speed_up = f'{statistics.median(times[0]) / median:.2f}x{spread}' if n else '1'
        percent = 100 * rate / peak
        verdict = '-' if goal is None else \
            f'{goal}%: {"met" if round(percent) >= goal else "below"}'
        rows.append((case if n == 0 else '', shape if n == 0 else '', label,
                     f'{median * 1e3:.0f}', f'{rate:.0f}', f'{percent:.0f}%', verdict,
                     speed_up, diffs[n] if diffs else '-'))
    return rows


def train_step(model: torch.nn.Module, x: torch.Tensor,
               precision: contextlib.AbstractContextManager) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        with precision:
            loss = sum(out.float().mean() for out in model(x))
        loss.backward()
    return step


def set_mode(models: Sequence[torch.nn.Module], training: bool, norm_eval: bool) -> None:
    for model in models:
        model.train(training)
        if norm_eval:
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn``'s first call (a compiled model compiles in it)."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def print_table(rows: List[Tuple[str, ...]]) -> None:
    header = ('case', 'input', 'model', 'ms', 'GFLOP/s', 'of peak', 'goal',
              'speed-up (quartiles)', 'max rel. diff')
    lines = [header] + rows
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print('| ' + ' | '.join(cell.ljust(w) for cell, w in zip(line, widths)) + ' |')
        if n == 0:
            print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weight_grads.set_weight_grad_layout(args.weight_grad)
    device = torch.device(args.device)
    precision = precision_context(args, device)
    clock = time.thread_time if args.cpu_time else time.perf_counter

    reference = ReferenceConvMLP(arch=args.arch).to(device)
    plain = ConvMLP(arch=args.arch).to(device)
    plain.load_state_dict(reference.state_dict())
    fast = accelerate_for_cpu(copy.deepcopy(plain))
    labels = ['authors\' layout', 'mmconvmlp plain', 'mmconvmlp']
    models = [reference, plain, fast]
    compile_s = None
    if args.compile:
        models.append(ConvMLP(arch=args.arch, compile=True).to(device))
        models[-1].load_state_dict(plain.state_dict())
        labels.append('mmconvmlp compiled')

    peak, kernel_rates = practical_peak(DTYPES[args.dtype], device, max(args.repeats, 3), clock)
    profiles = [] if args.profile else None
    bandwidth = copy_bandwidth(device, 5, clock) if args.profile else 0.
    extra = dict(profiles=profiles, bandwidth=bandwidth)
    rows = []
    for shape in args.infer_input:
        x = torch.randn(shape, device=device)
        set_mode(models, training=False, norm_eval=False)
        with torch.no_grad():
            flop = backbone_flop(plain, x)
            with precision:
                if args.compile and compile_s is None:
                    compile_s = first_call_seconds(lambda: models[-1](x), device)
                outs = [model(x) for model in models]
                diffs = [''] + [f'{relative_difference(o, outs[0]):.1e}' for o in outs[1:]]
                rows += case_rows('inference', x, labels,
                                  [lambda m=m: m(x) for m in models], flop, peak, args,
                                  device, clock, diffs, **extra,
                                  goal=GOALS['inference', args.dtype])
    cases = [('train step', False)] + [('  with norm_eval', True)] * args.norm_eval
    for shape in args.train_input:
        x = torch.randn(shape, device=device)
        flop = 3 * backbone_flop(plain.eval(), x)
        for case, norm_eval in cases:
            set_mode(models, training=True, norm_eval=norm_eval)
            fns = [train_step(model, x, precision) for model in models]
            rows += case_rows(case, x, labels, fns, flop, peak, args, device, clock,
                              **extra, goal=GOALS['train step', args.dtype])
        if args.bounds:
            set_mode(models, training=True, norm_eval=False)
            bound_labels, bound_fns = [labels[0]], [train_step(reference, x, precision)]
            for label, layer_types in BOUNDS:
                bound_labels.append(label)
                bound_fns.append(train_step(without(fast, layer_types), x, precision))
            rows += case_rows('train step bounds', x, bound_labels, bound_fns, flop, peak,
                              args, device, clock)

    kernels = ', '.join(f'{name} {rate:.0f}' for name, rate in kernel_rates.items())
    compiled = f'; compile=True first call {compile_s:.0f} s' if compile_s is not None else ''
    print(f'ConvMLP-{args.arch.upper()} on {machine_header(device)}\n'
          f'{args.dtype}; practical peak {peak:.0f} GFLOP/s (best of {kernels}); '
          f'median of {args.repeats} runs, '
          f'{"CPU time of this thread" if args.cpu_time else "wall clock"}{compiled}\n'
          f'GFLOP/s = 2 x FlopAnalyzer MACs of the backbone (x3 for a training step) / time\n')
    print_table(rows)
    if profiles:
        print('\nWhere the time goes (one run each, torch.profiler self time):')
        for line in profiles:
            print(f'- {line}')


if __name__ == '__main__':
    main()
