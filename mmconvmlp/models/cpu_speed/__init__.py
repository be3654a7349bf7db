"""Speed on CPUs, as a layer over the plain network of :mod:`mmconvmlp.models.convmlp`.

Nothing here runs unless asked for: a model stays the plain network (which tracers,
exporters and readers see) until one of these functions is applied to it.

* :func:`accelerate_for_cpu_inference` (:mod:`.inference`): the tokenizer and the
  convolutional stage in bands of rows with their BatchNorms folded, the channel MLPs in
  bands of pixels with oneDNN's fused calls on AVX-512;
* :func:`accelerate_for_cpu_training` (:mod:`.weight_grads`): convolution weight gradients
  from channels-first copies on CPUs whose channels-last kernel for them is slow (AVX2);
* :func:`accelerate_for_cpu` applies both; :func:`remove_cpu_acceleration` undoes both;
* :class:`CPUAccelerationHook` applies both to a runner's model before it runs
  (``ConvMLPRunner`` registers it); ``tools/infer.py`` and ``tools/analysis/benchmark.py``
  call :func:`accelerate_for_cpu_inference`.

Each changes only the classes of the modules concerned (parameters, buffers and names stay),
and each fast ``forward`` falls back to the plain one where a call does not qualify (a GPU,
an autograd graph to record for inference, tracing or compiling), so an accelerated model
still trains, runs on a GPU and loads checkpoints as before.
"""
import torch.nn as nn

from .inference import accelerate_for_cpu_inference, remove_cpu_inference_route
from .weight_grads import (accelerate_for_cpu_training, remove_cpu_training_route,
                           set_weight_grad_layout)


def accelerate_for_cpu(model: nn.Module) -> nn.Module:
    """Both layers: :func:`accelerate_for_cpu_inference` and
    :func:`accelerate_for_cpu_training`. Returns ``model``."""
    return accelerate_for_cpu_training(accelerate_for_cpu_inference(model))


def remove_cpu_acceleration(model: nn.Module) -> nn.Module:
    """The plain network again, e.g. before tracing or exporting. Returns ``model``."""
    return remove_cpu_training_route(remove_cpu_inference_route(model))


__all__ = ['accelerate_for_cpu', 'accelerate_for_cpu_inference', 'accelerate_for_cpu_training',
           'remove_cpu_acceleration', 'set_weight_grad_layout']
