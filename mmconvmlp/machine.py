"""What machine this is, for the headers of the benchmark tools, how to hold a CPU to AVX2
to stand in for an AVX2-only one, and the clock of the probes that choose by what the CPU
does (:mod:`mmconvmlp.engine.precision`, :mod:`mmconvmlp.models.cpu_speed.weight_grads`)."""
import os
import platform
import time
from typing import Callable

import torch

#: Environment that keeps PyTorch's kernels, oneDNN and MKL within AVX2 (and so without
#: bfloat16 units) on a CPU with AVX-512; set before the process starts.
AVX2_ONLY = {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2',
             'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


#: /proc/cpuinfo flags that decide which kernels oneDNN can run, and how to name them.
ISA_FLAGS = (('avx2', 'AVX2'), ('avx512f', 'AVX-512'), ('avx512_bf16', 'AVX512-BF16'),
             ('amx_tile', 'AMX'))
#: Environment variables that hold PyTorch's kernels, oneDNN or MKL below what the CPU has.
ISA_LIMITS = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS')


def cpu_isa() -> str:
    """The instruction sets of :data:`ISA_FLAGS` this CPU has, e.g. ``AVX2 AVX-512 AMX``,
    from /proc/cpuinfo (empty where there is none)."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            flags = next((line.split(':', 1)[1].split() for line in cpuinfo
                          if line.startswith('flags')), [])
    except OSError:
        return ''
    return ' '.join(name for flag, name in ISA_FLAGS if flag in flags)


def describe_device(device: torch.device) -> str:
    """One line: the GPU's name, or the CPU's model, the instruction set PyTorch's kernels
    use with any limits set in the environment (:data:`ISA_LIMITS`), whether bfloat16 is
    native (by :func:`~mmconvmlp.engine.precision.cpu_bfloat16_speed`'s probe), the
    instruction sets the CPU has (:func:`cpu_isa`) and the threads."""
    if device.type == 'cuda':
        return (f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, '
                f'torch {torch.__version__})')
    from mmconvmlp.engine.precision import cpu_bfloat16_speed
    limits = ', '.join(f'{name}={os.environ[name]}' for name in ISA_LIMITS
                       if os.environ.get(name))
    speed = cpu_bfloat16_speed()
    bf16 = (f'native ({1 / speed:.1f}x float32 in a probe)' if speed < 1 else
            f'emulated ({speed:.0f}x slower than float32 in a probe)')
    return (f'{cpu_model()}; instruction set {torch.backends.cpu.get_cpu_capability()}'
            f'{" (" + limits + ")" if limits else ""}; bfloat16 {bf16}; '
            f'CPU has {cpu_isa() or "no flags listed"}; '
            f'{torch.get_num_threads()} threads; torch {torch.__version__}')


def best_thread_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest CPU time over ``repeats`` calls of ``fn``, after one untimed call
    (kernel selection, weight reorders and other one-off costs), all on one torch thread:
    the calling thread's CPU time then counts all the work, and other processes on a busy
    machine count less than in wall-clock time. The thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        best = float('inf')
        for _ in range(repeats):
            start = time.thread_time()
            fn()
            best = min(best, time.thread_time() - start)
        return best
    finally:
        torch.set_num_threads(threads)
