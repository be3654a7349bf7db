"""``ConvMLPRunner``: mmengine's Runner with mmconvmlp's runtime fixes.

Every config shipped here names it (``runner_type = 'ConvMLPRunner'``), so the fixes reach
every entry point that builds a Runner from such a config: mmdet's and mmseg's own
``tools/train.py`` and ``tools/test.py`` (they call ``RUNNERS.build(cfg)`` when a config
names a runner type) as well as ``tools/train.py`` and ``tools/test.py`` here. It adds:

* several processes (:mod:`.cpu_processes`): a launcher that did not set its variables is
  named in one line; without CUDA, ``--launcher pytorch``, ``slurm`` or ``mpi`` starts gloo
  processes, and ``OMP_NUM_THREADS`` sets the thread count;
* the data check (:mod:`.data_check`): training, validation and testing first make sure the
  data they read exist, and stop with :class:`~.data_check.DataNotFoundError` otherwise;
* data that exist but cannot be used (:mod:`.data_errors`): a missing or unreadable image, a
  damaged annotation file, or a split with nothing to train or evaluate on stops the run with
  one message naming the file; annotations of unknown categories give a warning with counts;
* validation and testing stop with :class:`~.weights_fit.WeightsMismatchError`, listing what
  does not match, when the checkpoint is not one of the config's model (:mod:`.weights_fit`);
* atomic checkpoints (:mod:`.atomic_save`): a checkpoint in a local folder becomes visible
  only once it is complete;
* ``--resume`` (``resume=True`` without ``load_from``) in a work dir that holds no
  checkpoint warns, naming the work dir, before training starts from the beginning;
* identical, quick resumes (:mod:`.resume_state`, :mod:`.resumable_loader`): the training
  loader can start at any batch without loading the ones before and seeds each sample's
  augmentation from its position; checkpoints carry every process's generator states and
  the sample position, restored when resuming, so a resumed run continues as the
  uninterrupted run would have; a resume with another layout continues at the right
  sample or stops with one message, and a checkpoint of another model stops it with
  :class:`~.weights_fit.WeightsMismatchError`;
* preemption (:mod:`.preemption`): SIGTERM or SIGUSR1 saves the current iteration and
  exits with status 75;
* one training per work dir (:mod:`.work_dir_lock`), which writes its config copy there
  only once it holds it; a failed save removes its partial
  file and says how much space it needed (:mod:`.atomic_save`); data-loader workers end
  with their process (:mod:`.worker_lifetime`).

Safe loading of mmengine's checkpoints (:mod:`.safe_loading`) needs no runner: importing
mmconvmlp sets it up for the whole process.
"""
import copy
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .atomic_save import failed_save, partial_name, publish
from .cpu_processes import (check_launcher_environment, set_cpu_threads,
                            setup_cpu_distributed)
from .cuda_ops import check_mmcv_cuda_ops
from .data_check import TEST_SECTIONS, TRAIN_SECTIONS, VAL_SECTIONS, check_data
from .data_errors import DataContentsHook, readable_data_errors
from .preemption import PreemptionHook
from .readable_errors import install_excepthook
from .resumable_loader import resumable_loader
from .resume_state import ResumeStateHook
from .weights_fit import CheckWeightsFitHook
from .work_dir_lock import hold_work_dir
from .worker_lifetime import TiedToMainProcess


@RUNNERS.register_module()
class ConvMLPRunner(Runner):
    """mmengine's Runner, plus CPU processes, the data check, atomic checkpoints, a
    warning when there is nothing to resume from, identical resumes, preemption and one
    training per work dir (see the module)."""

    @classmethod
    def from_cfg(cls, cfg) -> 'ConvMLPRunner':
        cfg = copy.deepcopy(cfg)
        install_excepthook()  # mmdet's and mmseg's own tools print our errors in one line too
        check_launcher_environment(cfg.get('launcher', 'none'))
        check_mmcv_cuda_ops()
        set_cpu_threads()
        setup_cpu_distributed(cfg, cfg.get('launcher', 'none'))
        return super().from_cfg(cfg)

    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        super().register_hooks(default_hooks, custom_hooks)
        self.register_hook(ResumeStateHook())
        self.register_hook(DataContentsHook())
        self.register_hook(PreemptionHook())
        from ..models.cpu_speed.hook import CPUAccelerationHook  # the CPU speed layers
        self.register_hook(CPUAccelerationHook())

    def _hook(self, kind):
        return next(hook for hook in self.hooks if isinstance(hook, kind))

    @staticmethod
    def build_dataloader(*args, **kwargs):
        """mmengine's data loader, whose workers end with this process and ignore the
        preemption signals that Slurm sends them too (:mod:`.worker_lifetime`)."""
        loader = Runner.build_dataloader(*args, **kwargs)
        if getattr(loader, 'num_workers', 0):
            loader.worker_init_fn = TiedToMainProcess(loader.worker_init_fn)
        return loader

    def build_train_loop(self, loop):
        if isinstance(self._train_dataloader, dict):
            diff_rank_seed = self._randomness_cfg.get('diff_rank_seed', False)
            self._train_dataloader = resumable_loader(
                self.build_dataloader(self._train_dataloader, seed=self.seed,
                                      diff_rank_seed=diff_rank_seed), self.seed)
        return super().build_train_loop(loop)

    def _check_data(self, sections) -> None:
        check_data(self.cfg, sections, self.cfg.filename or '')

    def dump_config(self) -> None:
        """mmengine writes ``WORK_DIR/<config>.py`` while it builds the runner, before a
        training takes the work dir: a second training there would overwrite the live run's
        copy. Here a training writes it once it holds the work dir, and validation and
        testing when they start."""
        self._config_to_dump = True

    def _dump_config_once(self) -> None:
        if getattr(self, '_config_to_dump', False):
            self._config_to_dump = False
            super().dump_config()

    def train(self):
        with hold_work_dir(self.work_dir, is_main_process()):
            self._dump_config_once()
            self._check_data(TRAIN_SECTIONS)
            with readable_data_errors(self.cfg, TRAIN_SECTIONS), \
                    self._hook(PreemptionHook).catching_signals():
                return super().train()

    def _check_weights_fit(self) -> None:
        if not any(isinstance(hook, CheckWeightsFitHook) for hook in self.hooks):
            self.register_hook(CheckWeightsFitHook())

    def val(self):
        self._dump_config_once()
        self._check_data(VAL_SECTIONS)
        self._check_weights_fit()
        with readable_data_errors(self.cfg, VAL_SECTIONS):
            return super().val()

    def test(self):
        self._dump_config_once()
        self._check_data(TEST_SECTIONS)
        self._check_weights_fit()
        with readable_data_errors(self.cfg, TEST_SECTIONS):
            return super().test()

    def load_or_resume(self) -> None:
        if self._resume and self._load_from is None and not self._has_loaded \
                and not osp.exists(osp.join(self.work_dir, 'last_checkpoint')):
            self.logger.warning(
                f'--resume: the work dir {self.work_dir} holds no checkpoint to resume from '
                '(no last_checkpoint file): training starts from the beginning.')
            self._resume = False
        super().load_or_resume()

    def resume(self, filename: str, *args, **kwargs) -> None:
        """mmengine's ``resume``, stopping with :class:`~.weights_fit.WeightsMismatchError`
        when the checkpoint is not one of the config's model."""
        self._load_from = filename  # the checkpoint the weights check names
        self._check_weights_fit()
        super().resume(filename, *args, **kwargs)

    def save_checkpoint(self, out_dir: str, filename: str, file_client_args=None, *args,
                        backend_args=None, **kwargs) -> None:
        """mmengine's ``save_checkpoint`` with every process's generator states; in local
        folders written under a hidden partial name and renamed once complete (other
        storage is written as mmengine writes it). Every process calls it, as mmengine's
        hooks do: the states are gathered to rank 0, which writes the file."""
        self._hook(ResumeStateHook).collect()
        if not is_main_process():
            return
        local = '://' not in out_dir and file_client_args is None and backend_args is None
        if not local:
            super().save_checkpoint(out_dir, filename, file_client_args, *args,
                                    backend_args=backend_args, **kwargs)
            return
        partial, final = osp.join(out_dir, partial_name(filename)), osp.join(out_dir, filename)
        try:
            super().save_checkpoint(out_dir, partial_name(filename), file_client_args, *args,
                                    backend_args=backend_args, **kwargs)
            publish(partial, final)
        except OSError as error:
            raise failed_save(partial, final, error, self._checkpoint_bytes()) from None

    def _checkpoint_bytes(self) -> int:
        """About the size of a checkpoint: the bytes of the weights and optimizer state."""
        total = 0

        def count(value):
            nonlocal total
            if hasattr(value, 'element_size'):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                for item in value.values():
                    count(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    count(item)
        count(self.model.state_dict())
        count(self.optim_wrapper.state_dict())
        return total
