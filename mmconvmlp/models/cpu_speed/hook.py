"""``CPUAccelerationHook``: the CPU layers of :mod:`mmconvmlp.models.cpu_speed` for a
runner's model, in training, validation and testing alike."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from . import accelerate_for_cpu


@HOOKS.register_module()
class CPUAccelerationHook(Hook):
    """Applies :func:`~mmconvmlp.models.cpu_speed.accelerate_for_cpu` to the runner's model
    before the run. Where the model runs on a GPU, the layers leave every call plain."""

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        accelerate_for_cpu(runner.model)
