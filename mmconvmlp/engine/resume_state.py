"""Resume where the run stopped, with the randomness it had: :class:`ResumeStateHook`.

mmengine 0.10.7 saves no generator states in its checkpoints, so a resumed run draws other
stochastic-depth masks and other augmentation than the uninterrupted run would have. The
hook (which :class:`~.runner.ConvMLPRunner` registers) adds ``resume_state`` to every
checkpoint: the states of the main process's global generators (``random``, numpy, torch,
CUDA) and the training sampler's seed, as tensors, numbers and lists (torch's safe loading
reads them). Resuming from such a checkpoint, it

* starts the training loader (a :mod:`.resumable_loader`) at the first batch not trained
  yet: mid-epoch in an epoch-based loop (the log then counts the epoch's batches from 0);
  in an iteration-based loop, where mmengine's loop would load and discard every batch
  already trained, it answers the loop's advancing calls without loading anything
  (mmengine still logs "Advance dataloader N steps");
* restores the generators right before that batch is loaded: the very point the
  uninterrupted run was at when the checkpoint was saved, as validation draws nothing from
  the training's generators (the hook puts their states back after each validation).

Workers seed each sample from its position (:mod:`.resumable_loader`), so their state needs
no saving. With several processes, the checkpoint holds the generators of rank 0, which
only rank 0 restores. Hooks that draw from the global generators between a checkpoint and
the next batch (after the checkpoint hook, or at the start of an epoch) are not covered.
"""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import BaseLoop, IterBasedTrainLoop

from .resumable_loader import ResumableDataLoader

#: The key of the checkpoint entry.
KEY = 'resume_state'


def generator_states() -> dict:
    """The global generators' states as tensors, numbers and lists."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = dict(
        python=dict(version=version, state=torch.tensor(python_state), gauss=gauss),
        numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)),
                   position=int(position), has_gauss=int(has_gauss), cached=float(cached)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_generator_states(states: dict) -> None:
    """Put back what :func:`generator_states` returned."""
    python = states['python']
    random.setstate((python['version'], tuple(python['state'].tolist()), python['gauss']))
    numpy = states['numpy']
    np.random.set_state((numpy['name'], numpy['keys'].numpy().astype(np.uint32),
                         numpy['position'], numpy['has_gauss'], numpy['cached']))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


class _TrainedBatches:
    """Stands in for ``IterBasedTrainLoop.dataloader_iterator``: answers the loop's first
    ``count`` calls (mmengine 0.10.7 advances past the trained batches by loading and
    discarding them) with None, loading nothing, then hands out ``iterator``'s batches."""

    def __init__(self, iterator, count: int):
        self._iterator = iterator
        self._count = count

    def __iter__(self):
        return self

    def __next__(self):
        if self._count:
            self._count -= 1
            return None
        return next(self._iterator)


class ResumeStateHook(Hook):
    """Saves and restores what carries a run's randomness (see the module)."""

    priority = 'NORMAL'

    def __init__(self):
        self._loaded = None  # (resume_state or None, meta iter) of the last checkpoint loaded
        self._training_states: Optional[dict] = None  # kept while validating

    @staticmethod
    def _train_loader(runner) -> Optional[ResumableDataLoader]:
        loop = runner._train_loop
        loader = getattr(loop, 'dataloader', None) if isinstance(loop, BaseLoop) else None
        return loader if isinstance(loader, ResumableDataLoader) else None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        loader = self._train_loader(runner)
        sampler_seed = getattr(loader.batch_sampler.sampler, 'seed', None) if loader else None
        checkpoint[KEY] = dict(generators=self._training_states or generator_states(),
                               sampler_seed=sampler_seed)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = (checkpoint.get(KEY), checkpoint.get('meta', {}).get('iter'))

    def before_val(self, runner) -> None:
        self._training_states = generator_states()

    def after_val(self, runner) -> None:
        if self._training_states is not None:
            set_generator_states(self._training_states)
            self._training_states = None

    def before_train_epoch(self, runner) -> None:
        """On the first epoch after a resume: start the loader at the first batch not
        trained, and restore the generators right before it is loaded."""
        if self._loaded is None:
            return
        state, saved_iter = self._loaded
        self._loaded = None
        loader = self._train_loader(runner)
        if runner.iter == 0 or runner.iter != saved_iter or loader is None:
            return  # not resumed from that checkpoint (load_from), or not our loader
        sampler = loader.batch_sampler.sampler
        if state is not None and state.get('sampler_seed') is not None \
                and hasattr(sampler, 'seed'):
            sampler.seed = state['sampler_seed']
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop):
            start = self._start_iteration_based(loop, loader)
        else:
            start = runner.iter - runner.epoch * len(loader)
        loader.batch_sampler.start_at(start)
        if state is None:
            print_log('The checkpoint resumed from holds no generator states (it was not '
                      'written by ConvMLPRunner): the resumed run draws other random '
                      'numbers than the interrupted one would have.', logger='current',
                      level='WARNING')
        elif get_rank() == 0:
            generators = state['generators']
            loader.before_next_load(lambda: set_generator_states(generators))

    @staticmethod
    def _start_iteration_based(loop, loader) -> int:
        """Make ``loop`` skip the trained batches without loading them; returns the batch
        of the current pass of the sampler to start at."""
        from mmengine.dataset import InfiniteSampler
        iterator = loop.dataloader_iterator
        start = loop.iter
        if not isinstance(loader.batch_sampler.sampler, InfiniteSampler):
            # a finite sampler: mmengine's iterator restarts it with the next epoch
            passes, start = divmod(loop.iter, len(loader))
            iterator._epoch = passes
            loader.batch_sampler.sampler.set_epoch(passes)
        loop.dataloader_iterator = _TrainedBatches(iterator, loop.iter)
        return start
