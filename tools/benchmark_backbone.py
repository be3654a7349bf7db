"""Time the mmconvmlp backbone against a plain implementation in the authors' layout.

Both models hold the same weights; the script prints one table with, per case, the median
time of each, the speed-up and how far the outputs of the two differ. The two models take
turns (in short blocks, see ``time_interleaved``), and the speed-up column also gives the
middle half (quartiles) of the speed-ups of runs paired in turn, so drift on a shared machine
shows as a range instead of hiding in one number.

    python tools/benchmark_backbone.py                 # ConvMLP-S, the cases below
    python tools/benchmark_backbone.py --arch l --repeats 10 --device cuda

The header names the machine: on a CPU its model, the instruction set PyTorch's kernels use
and whether bfloat16 runs natively (``mmconvmlp.engine.precision.cpu_bfloat16_speed``), and
where mmconvmlp computes convolution weight gradients (``mmconvmlp.models.layouts``); on a
GPU its name.

Cases: inference on 1x3x800x1216 and 1x3x640x640 (eval mode, no gradients), and a training
step (forward, backward) on 2x3x512x512 with BatchNorm in training mode and with frozen
BatchNorm statistics (``norm_eval``, as detection fine-tuning often runs). ``--infer-input``
and ``--train-input`` time other sizes (one or more each). ``--dtype bfloat16`` times both
models under bfloat16 autocast.

``--bounds`` adds training-step rows for mmconvmlp with some layers replaced by identities:
not models, but bounds on what the step could cost if those layers were free.

``--compile`` adds a row under each case for mmconvmlp with ``compile=True`` (timed in turn
with the other two, against the same plain implementation); its label gives the seconds of
its first call, which compiles and is not timed. ``--cpu-time`` times by this thread's CPU
time (``time.thread_time``) instead of the wall clock: with ``--threads 1`` all the work runs
on that thread, and other processes on a shared host disturb it far less.
"""
import argparse
import contextlib
import copy
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

from mmconvmlp.engine.precision import cpu_bfloat16_speed
from mmconvmlp.machine import describe_device
from mmconvmlp.models import ConvMLP, layouts
from mmconvmlp.testing import ReferenceConvMLP


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='s', choices=['s', 'm', 'l'])
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per case and model')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s own choice)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--infer-input', type=input_shape, nargs='+',
                        default=[(1, 3, 800, 1216), (1, 3, 640, 640)],
                        help='inputs of the inference case, BxCxHxW each')
    parser.add_argument('--train-input', type=input_shape, nargs='+',
                        default=[(2, 3, 512, 512)],
                        help='inputs of the training-step cases, BxCxHxW each')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                        help='float32, or bfloat16 autocast (refused on a CPU that emulates '
                             'bfloat16, unless --force)')
    parser.add_argument('--force', action='store_true',
                        help='time bfloat16 even where the CPU emulates it')
    parser.add_argument('--weight-grad', default='auto', choices=layouts.WEIGHT_GRAD_LAYOUTS,
                        help='where mmconvmlp computes convolution weight gradients on the CPU '
                             '(default: measured, see mmconvmlp.models.layouts)')
    parser.add_argument('--compile', action='store_true',
                        help='also time mmconvmlp with compile=True (torch.compile)')
    parser.add_argument('--cpu-time', action='store_true',
                        help='time by this thread\'s CPU time (use with --threads 1)')
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
BOUNDS = (('  bound: no BatchNorm', (torch.nn.BatchNorm2d,)),
          ('  bound: no BN/ReLU/LN/GELU', (torch.nn.BatchNorm2d, torch.nn.ReLU,
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
            f'conv weight gradients (training): {layouts.weight_grad_layout()}')


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


def time_interleaved(fns: List[Callable[[], None]], repeats: int, device: torch.device,
                     block: int = 3, clock: Callable[[], float] = time.perf_counter
                     ) -> List[List[float]]:
    """Seconds of ``repeats`` runs of each function. The functions take turns in blocks of
    ``block`` timed runs, each block after one untimed run: drift on the machine hits all of
    them alike, and each is timed the way a training or inference loop runs it, after a run
    of its own (a step right after another model's meets a heap laid out for that model and
    pays for fresh pages that a loop of its own would reuse). The first untimed run also
    takes the one-off costs of a first call. ``clock`` gives the time in seconds."""
    times = [[] for _ in fns]
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


def summarize(case: str, shape: str, ref_times: List[float], our_times: List[float],
              diff: str) -> Tuple[str, ...]:
    """One table row: median times, median speed-up and the quartiles of the per-pair ones."""
    ref, ours = statistics.median(ref_times), statistics.median(our_times)
    ratios = [r / o for r, o in zip(ref_times, our_times)]
    spread = ''
    if len(ratios) >= 4:
        low, _, high = statistics.quantiles(ratios, n=4)
        spread = f' ({low:.2f}-{high:.2f})'
    return (case, shape, f'{ref * 1e3:.0f} ms', f'{ours * 1e3:.0f} ms', f'{ref / ours:.2f}x{spread}',
            diff)


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn``'s first call (a compiled model compiles in it)."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def shape_text(x: torch.Tensor) -> str:
    return 'x'.join(map(str, x.shape))


def relative_difference(outs, refs) -> float:
    return max(((o.float() - r.float()).norm() / r.float().norm()).item()
               for o, r in zip(outs, refs))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts.set_weight_grad_layout(args.weight_grad)
    device = torch.device(args.device)
    precision = precision_context(args, device)
    ours = ConvMLP(arch=args.arch).to(device)
    reference = ReferenceConvMLP(arch=args.arch).to(device)
    reference.load_state_dict(ours.state_dict())
    models = [reference, ours]
    if args.compile:
        models.append(ConvMLP(arch=args.arch, compile=True).to(device))
        models[-1].load_state_dict(ours.state_dict())
    clock = time.thread_time if args.cpu_time else time.perf_counter

    def timed_rows(case: str, x: torch.Tensor, fns: List[Callable[[], object]],
                   diffs: Callable[[], List[str]]) -> List[Tuple[str, ...]]:
        """The case's row, and with --compile the compiled model's row under it; ``diffs``
        (called after the compiled model's first call) gives their last cells."""
        compile_s = first_call_seconds(fns[2], device) if args.compile else 0
        times = time_interleaved(fns, args.repeats, device, clock=clock)
        diffs = diffs()
        rows = [summarize(case, shape_text(x), times[0], times[1], diffs[0])]
        if args.compile:
            rows.append(summarize(f'  compiled (first call {compile_s:.0f} s)', shape_text(x),
                                  times[0], times[2], diffs[1]))
        return rows

    rows = []
    for model in models:
        model.eval()
    for shape in args.infer_input:
        x = torch.randn(shape, device=device)
        with torch.no_grad(), precision:
            def infer(model):
                return lambda: model(x)

            def diffs():
                outs = [model(x) for model in models]
                return [f'{relative_difference(out, outs[0]):.1e}' for out in outs[1:]] + ['']
            rows += timed_rows('inference', x, [infer(model) for model in models], diffs)

    def train_step(model, x):
        def step():
            model.zero_grad(set_to_none=True)
            with precision:
                loss = sum(out.float().mean() for out in model(x))
            loss.backward()
        return step
    for shape in args.train_input:
        x = torch.randn(shape, device=device)
        for case, norm_eval in (('train step (fwd+bwd)', False), ('  with norm_eval', True)):
            for model in models:
                model.train()
                if norm_eval:
                    for module in model.modules():
                        if isinstance(module, torch.nn.BatchNorm2d):
                            module.eval()
            rows += timed_rows(case, x, [train_step(model, x) for model in models],
                               lambda: ['-', '-'])
        if args.bounds:
            for model in (ours, reference):
                model.train()
            for case, layer_types in BOUNDS:
                t_ref, t_bound = time_interleaved(
                    [train_step(reference, x), train_step(without(ours, layer_types), x)],
                    args.repeats, device)
                rows.append(summarize(case, shape_text(x), t_ref, t_bound, '-'))

    print(f'ConvMLP-{args.arch.upper()} on {machine_header(device)}\n'
          f'{args.dtype}, median of {args.repeats} runs, '
          f'{"CPU time of this thread" if args.cpu_time else "wall clock"}\n')
    header = ('case', 'input', 'authors\' layout', 'mmconvmlp', 'speed-up (quartiles)',
              'max rel. diff')
    lines = [header] + rows
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print('| ' + ' | '.join(cell.ljust(w) for cell, w in zip(line, widths)) + ' |')
        if n == 0:
            print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')


if __name__ == '__main__':
    main()
