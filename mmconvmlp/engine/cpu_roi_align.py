"""mmcv's RoIAlign through torchvision's kernel on the CPU.

mmcv's CPU RoIAlign is a large part of Mask R-CNN's inference on a CPU. torchvision's
``roi_align``, which mmcv's own ``RoIAlign(use_torchvision=True)`` calls, computes the same
bilinear average for average pooling with ``aligned=True`` (mmdet's setting, any
``sampling_ratio``, 0 included: as many samples as the bin spans), faster (measurements in
the README's inference-precision section). CUDA models keep mmcv's kernels.
"""
import torch


def use_torchvision_roi_align(model: torch.nn.Module) -> int:
    """Switch every mmcv ``RoIAlign`` in ``model`` that averages with ``aligned=True`` to
    torchvision's kernel (``use_torchvision``); returns how many were switched. Only for a
    model on the CPU: on CUDA it is left alone and 0 is returned."""
    from mmcv.ops import RoIAlign
    layers = [module for module in model.modules() if isinstance(module, RoIAlign)
              and module.pool_mode == 'avg' and module.aligned and not module.use_torchvision]
    if not layers or next(model.parameters()).device.type != 'cpu':
        return 0
    for layer in layers:
        layer.use_torchvision = True
    return len(layers)
