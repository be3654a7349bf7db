"""Resume where the run stopped, with the randomness every process had: :class:`ResumeStateHook`.

mmengine 0.10.7 saves no generator states in its checkpoints, so a resumed run draws other
stochastic-depth masks and other augmentation than the uninterrupted run would have. The
hook (which :class:`~.runner.ConvMLPRunner` registers) adds ``resume_state`` to every
checkpoint, as tensors, numbers and lists (torch's safe loading reads them):

* ``ranks``: the states of every process's global generators (``random``, numpy, torch,
  and CUDA for the GPU the process uses), gathered to rank 0 when a checkpoint is saved
  (:meth:`ResumeStateHook.collect`, called by every process);
* ``layout``: the number of processes, the batch size of each, the length of the training
  set and the batches of a pass over it;
* ``position``: the pass of the sampler (the epoch) and how many of its samples, over all
  processes, were trained; and the sampler's seed.

Resuming from such a checkpoint, it

* starts the training loader (a :mod:`.resumable_loader`) at the first sample not trained
  yet: mid-epoch in an epoch-based loop (the log then counts the epoch's batches from 0);
  in an iteration-based loop, where mmengine's loop would load and discard every batch
  already trained, it answers the loop's advancing calls without loading anything
  (mmengine still logs "Advance dataloader N steps");
* restores each process's generators right before that batch is loaded: the very point
  the uninterrupted run was at when the checkpoint was saved, as validation draws nothing
  from the training's generators (the hook puts their states back after each validation).

Another number of processes, batch size or data set than the checkpoint's continues at
the checkpoint's sample, with a warning that the run will not be bit-identical to an
uninterrupted one (and why); where no batch of the new layout starts at that sample, or a
changed data set makes the rest of a pass unknowable, it stops with
:class:`ResumeMismatchError` naming the difference, instead of training the wrong samples
(or none). Workers seed each sample from its position (:mod:`.resumable_loader`), so their
state needs no saving. Hooks that draw from the global generators between a checkpoint and
the next batch (after the checkpoint hook, or at the start of an epoch) are not covered.
"""
import logging
import random
from typing import Optional

import numpy as np
import torch
from mmengine.dist import gather_object, get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import BaseLoop, IterBasedTrainLoop

from .readable_errors import ReadableError
from .resumable_loader import ResumableDataLoader

#: The key of the checkpoint entry.
KEY = 'resume_state'


class ResumeMismatchError(ReadableError, ValueError):
    """A run cannot continue at the sample where its checkpoint stopped."""


def generator_states() -> dict:
    """This process's global generators' states as tensors, numbers and lists; on a GPU,
    the generator of the GPU it uses (not of every visible one)."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = dict(
        python=dict(version=version, state=torch.tensor(python_state), gauss=gauss),
        numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)),
                   position=int(position), has_gauss=int(has_gauss), cached=float(cached)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        states['cuda'] = dict(device=device, state=torch.cuda.get_rng_state(device))
    return states


def set_generator_states(states: dict) -> None:
    """Put back what :func:`generator_states` returned; a CUDA state goes to the GPU this
    process uses now (its index may differ: another set of visible GPUs). A process without
    CUDA has no CUDA generator to restore."""
    python = states['python']
    random.setstate((python['version'], tuple(python['state'].tolist()), python['gauss']))
    numpy = states['numpy']
    np.random.set_state((numpy['name'], numpy['keys'].numpy().astype(np.uint32),
                         numpy['position'], numpy['has_gauss'], numpy['cached']))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states['cuda']['state'], torch.cuda.current_device())


def loader_layout(loader: ResumableDataLoader) -> dict:
    """How the training set is split into iterations."""
    return dict(processes=get_world_size(), batch_size=loader.batch_size,
                dataset_length=len(loader.dataset), batches_per_pass=len(loader))


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
    """Saves and restores what carries a run's randomness and its place in the data (see
    the module)."""

    priority = 'NORMAL'

    def __init__(self):
        self._loaded = None  # (resume_state or None, meta, path) of the last checkpoint loaded
        self._training_states: Optional[dict] = None  # kept while validating
        self._collected: Optional[list] = None  # every process's states, for the next save
        self._pass = 0  # the sampler pass (epoch) being trained
        self._pass_start_iter = 0  # the iteration that trained (or would have) its first batch

    @staticmethod
    def _train_loader(runner) -> Optional[ResumableDataLoader]:
        loop = runner._train_loop
        loader = getattr(loop, 'dataloader', None) if isinstance(loop, BaseLoop) else None
        return loader if isinstance(loader, ResumableDataLoader) else None

    def collect(self) -> None:
        """Gather every process's generator states to rank 0 for the checkpoint about to be
        saved. Every process calls it (:meth:`.ConvMLPRunner.save_checkpoint`)."""
        self._collected = gather_object(self._training_states or generator_states())

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        ranks, self._collected = self._collected, None
        state = dict(ranks=ranks or [self._training_states or generator_states()])
        loader = self._train_loader(runner)
        if loader is not None:
            state.update(sampler_seed=getattr(loader.batch_sampler.sampler, 'seed', None),
                         layout=loader_layout(loader),
                         position=self._position(runner, loader, checkpoint['meta']['iter']))
        checkpoint[KEY] = state

    def _position(self, runner, loader, iteration: int) -> dict:
        """The pass of the sampler and its samples trained after ``iteration`` iterations."""
        samples_per_iter = loader.batch_size * get_world_size()
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop) and not _is_infinite(loader):
            passes, batches = divmod(iteration, len(loader))  # no layout change (checked)
            return dict(epoch=passes, samples=batches * samples_per_iter)
        batches = iteration - self._pass_start_iter
        if not isinstance(loop, IterBasedTrainLoop) and batches >= len(loader):
            return dict(epoch=self._pass + 1, samples=0)
        return dict(epoch=self._pass, samples=batches * samples_per_iter)

    def ends_pass(self, runner, iteration: int) -> Optional[bool]:
        """Whether ``iteration`` iterations end the pass over the training set being trained
        (a resumed pass included); None where the loader is not resumable."""
        loader = self._train_loader(runner)
        if loader is None:
            return None
        return iteration - self._pass_start_iter >= len(loader)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = (checkpoint.get(KEY), checkpoint.get('meta', {}),
                        getattr(runner, '_load_from', None))

    def before_val(self, runner) -> None:
        self._training_states = generator_states()

    def after_val(self, runner) -> None:
        if self._training_states is not None:
            set_generator_states(self._training_states)
            self._training_states = None

    def before_train_epoch(self, runner) -> None:
        """On the first epoch after a resume: start the loader at the first sample not
        trained, and restore the generators right before it is loaded."""
        loaded, self._loaded = self._loaded, None
        start = 0
        if loaded is not None and runner.iter and runner.iter == loaded[1].get('iter'):
            start = self._resume(runner, *loaded)
        self._pass = runner.epoch
        self._pass_start_iter = runner.iter - start

    def _resume(self, runner, state: Optional[dict], meta: dict, path: str) -> int:
        """Set the loader, the sampler and the generators where the checkpoint stopped;
        returns the batch of the current pass to start at."""
        loader = self._train_loader(runner)
        if loader is None:
            return 0
        if state is None or 'ranks' not in state:
            print_log(f'The checkpoint {path} holds no generator states and no sample '
                      'position (it was not written by this version of ConvMLPRunner): '
                      'the resumed run draws other random numbers than the interrupted '
                      'one would have.', logger='current', level=logging.WARNING)
            start = self._start_unchanged(runner, loader)
        else:
            start = self._start_from_position(runner, loader, state, path)
            sampler = loader.batch_sampler.sampler
            if state.get('sampler_seed') is not None and hasattr(sampler, 'seed'):
                sampler.seed = state['sampler_seed']
            ranks = state['ranks']
            if get_rank() < len(ranks):
                generators = ranks[get_rank()]
                loader.before_next_load(lambda: set_generator_states(generators))
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop):
            start = self._skip_iteration_based(loop, loader, start)
        loader.batch_sampler.start_at(start)
        return start

    @staticmethod
    def _start_unchanged(runner, loader) -> int:
        if isinstance(runner.train_loop, IterBasedTrainLoop):
            return runner.iter
        return runner.iter - runner.epoch * len(loader)

    @staticmethod
    def _start_from_position(runner, loader, state: dict, path: str) -> int:
        """The batch of the current pass that starts at the checkpoint's sample position;
        a warning when the layout changed, :class:`ResumeMismatchError` when it cannot."""
        saved, now = state['layout'], loader_layout(loader)
        epoch, samples = state['position']['epoch'], state['position']['samples']
        names = dict(processes='processes', batch_size='batch size per process',
                     dataset_length='training images')
        changes = [f'{names[key]} {saved[key]} -> {now[key]}' for key in names
                   if saved[key] != now[key]]
        if not changes:
            return samples // (now['batch_size'] * now['processes'])
        where = (f'{path} was saved after {samples} samples of pass {epoch + 1} over the '
                 f'training set ({", ".join(changes)})')
        if samples and saved['dataset_length'] != now['dataset_length']:
            raise ResumeMismatchError(
                f'{where}: with another training set the samples left in that pass are '
                'unknown. Resume with the training set of the checkpoint, or from a '
                'checkpoint saved at the end of an epoch, or start a new run from its '
                'weights with --cfg-options load_from=CHECKPOINT.')
        if isinstance(runner.train_loop, IterBasedTrainLoop) and not _is_infinite(loader):
            raise ResumeMismatchError(
                f'{where}: an iteration-based run over a finite sampler resumes only with '
                'the layout it was saved with. Resume with the processes, batch size and '
                'training set of the checkpoint.')
        per_iter = now['batch_size'] * now['processes']
        if samples % per_iter:
            raise ResumeMismatchError(
                f'{where}: this run trains {per_iter} samples an iteration '
                f'({now["processes"]} x {now["batch_size"]}), which does not divide '
                f'{samples}, so no iteration of it starts at the checkpoint\'s sample. '
                'Resume with a number of processes and a batch size whose product '
                f'divides {samples}, e.g. those of the checkpoint '
                f'({saved["processes"]} x {saved["batch_size"]}).')
        why = []
        if saved['processes'] != now['processes']:
            why.append(f'each of the {saved["processes"]} processes had its own random '
                       f'generators, which {now["processes"]} processes cannot continue '
                       'one to one')
        if saved['batch_size'] * saved['processes'] != per_iter:
            why.append(f'an iteration takes {per_iter} samples instead of '
                       f'{saved["batch_size"] * saved["processes"]} (and the learning-rate '
                       'schedule counts iterations)')
        if saved['dataset_length'] != now['dataset_length']:
            why.append('the training set changed')
        print_log(f'{where}. Training continues at that sample, but the result will not '
                  f'be bit-identical to an uninterrupted run: {"; ".join(why)}.',
                  logger='current', level=logging.WARNING)
        return samples // per_iter

    @staticmethod
    def _skip_iteration_based(loop, loader, start: int) -> int:
        """Make ``loop`` skip the trained batches without loading them; returns the batch
        of the current pass of the sampler to start at."""
        iterator = loop.dataloader_iterator
        if not _is_infinite(loader):
            # a finite sampler: mmengine's iterator restarts it with the next epoch
            passes, start = divmod(loop.iter, len(loader))
            iterator._epoch = passes
            loader.batch_sampler.sampler.set_epoch(passes)
        loop.dataloader_iterator = _TrainedBatches(iterator, loop.iter)
        return start


def _is_infinite(loader) -> bool:
    from mmengine.dataset import InfiniteSampler
    return isinstance(loader.batch_sampler.sampler, InfiniteSampler)
