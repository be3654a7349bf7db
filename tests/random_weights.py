"""Random values for every weight and buffer of a model, shared by the tests of the timm
models and of the checkpoint conversion (pytest puts this folder on ``sys.path``)."""
import torch


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Fill every floating-point parameter and buffer of ``model`` (BatchNorm statistics
    included; running variances stay positive) with seeded random values, so that a
    comparison cannot pass on default initial values. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=gen)
                tensor.copy_(values + 0.5 if 'running_var' in name else values * 0.2 - 0.1)
    return model
