"""The opt-in compiled path (``compile=True``): the network's taps through ``torch.compile``,
with one warning and eager mode from then on where compiling fails.

The compiled unit is :func:`all_taps` of a
:class:`~mmconvmlp.models.convmlp.ConvMLPFeatures` (its ``taps`` method calls it), so
parameter and buffer names, and hence state dicts and checkpoints, are those of the eager
model. :func:`compile_forward` does the
same for any other module (the benchmarks compile other backbones with it).

It compiles once per input size and grad mode (``dynamic=False``): torch 2.13's inductor
fails on this network with symbolic sizes, in training always (pytorch/pytorch#185510:
symbolic strides in its stride sorting) and in inference for some batches
(``ValueRangeError`` lowering a stride check), and torch's automatic dynamic shapes would
meet those failures at the second size. Torch's limit on recompilations
(``torch._dynamo.config.recompile_limit``, 8 by default) bounds how many sizes are
compiled; further sizes run eager, and torch logs when.

On the CPUs measured here it is not faster than eager mode (``docs/speed.md``: the training
step is the same oneDNN and MKL kernels either way, near the cores' peak).
"""
import functools
import warnings
from typing import Any, Callable, List, Optional

import torch

from ..engine.readable_errors import first_line


class CompileFallbackWarning(RuntimeWarning):
    """The compiled path failed; the model runs eager from then on."""


def all_taps(model: torch.nn.Module, x: torch.Tensor, last: int) -> List[torch.Tensor]:
    """``model.forward_taps(x, last)``: taps 0..``last`` as channels-last-memory
    (B, C_i, H_i, W_i) maps, what ``compile=True`` compiles."""
    return model.forward_taps(x, last)


class CompiledCall:
    """``fn`` compiled on first use, for static sizes (see the module docs).

    If compiling or running the compiled code raises while eager mode computes the same call
    without error, it warns once (:class:`CompileFallbackWarning`, naming ``owner`` and the
    compiler's reason) and runs ``fn`` eagerly from then on; an error that eager mode raises
    too is the input's, and is raised as eager mode raises it. Copies and pickles start
    uncompiled."""

    def __init__(self, fn: Callable, owner: str):
        self.fn = fn
        self.owner = owner
        self.failed = False
        self._compiled: Optional[Callable] = None

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.fn(*args)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=False)
            return self._compiled(*args)
        except Exception as error:  # the compiler's own errors have no common base class
            reason = f'{type(error).__name__}: {first_line(error)}'
        result = self.fn(*args)  # outside the except block: no chained traceback
        self.failed = True
        warnings.warn(f'{self.owner}(compile=True): torch.compile failed ({reason}); running '
                      f'eager from now on.', CompileFallbackWarning, stacklevel=3)
        return result

    def __getstate__(self) -> dict:
        return dict(self.__dict__, failed=False, _compiled=None)


def compiled_taps_if(compile: bool, owner: str) -> Optional[CompiledCall]:
    """:func:`all_taps` as a :class:`CompiledCall` for ``compile=True``, None for False;
    anything else raises ``ValueError``."""
    if not isinstance(compile, bool):
        raise ValueError(f'{owner} compile={compile!r} is invalid: give True (torch.compile) '
                         f'or False (eager, the default).')
    return CompiledCall(all_taps, owner) if compile else None


def compile_forward(module: torch.nn.Module) -> torch.nn.Module:
    """Route ``module``'s calls through a :class:`CompiledCall` of its class's ``forward``
    (any backbone; a ConvMLP takes ``compile=True`` instead). Returns ``module``."""
    compiled = CompiledCall(type(module).forward, type(module).__name__)
    module.forward = functools.partial(compiled, module)
    return module

