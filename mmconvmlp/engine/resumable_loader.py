"""A training data loader that can start anywhere in an epoch, with the same samples and the
same augmentation as a run that never stopped.

mmengine 0.10.7 resumes an iteration-based run by loading and discarding every batch already
trained, and an epoch-based one from the start of the epoch; its data-loader workers draw
their augmentation from generators seeded once per worker, so a resumed run (new workers)
augments differently from an uninterrupted one. :func:`resumable_loader` rebuilds the
training loader mmengine built (same dataset, sampler, batch sampler, workers, collate
function) so that:

* :meth:`ResumableBatchSampler.start_at` makes the next pass begin after its first batches,
  drawing only their indices, never loading them;
* in a worker process each sample is loaded with the global generators (``random``, numpy,
  torch) seeded from the sampler's seed, the rank, the sampler's epoch and the sample's
  position in the epoch (:func:`sample_seed`): its augmentation depends on nothing else, not
  on the worker that loads it nor on what that worker loaded before; without workers the
  samples draw from the main process's generators, which the checkpoints carry;
* an iterator of the loader starts working when its first batch is asked for, and creating
  one draws nothing from torch's global generator (the loader has its own), so that
  :meth:`ResumableDataLoader.before_next_load` runs exactly before the first batch is loaded.
"""
import functools
import random
from typing import Callable, List, Optional

import numpy as np
import torch
from mmengine.dist import get_rank
from torch.utils.data import DataLoader, get_worker_info


class SampleIndex(int):
    """A dataset index carrying the seed its sample is loaded with in a worker."""

    def __new__(cls, index: int, seed: int):
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self):
        return SampleIndex, (int(self), self.seed)


def sample_seed(sampler_seed: int, rank: int, epoch: int, position: int) -> int:
    """A 32-bit seed for the sample at ``position`` of ``rank``'s share of an epoch."""
    entropy = [int(value) % 2**63 for value in (sampler_seed, rank, epoch, position)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_global_generators(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ResumableBatchSampler:
    """The batches of ``batch_sampler`` as lists of :class:`SampleIndex`; after
    :meth:`start_at`, the next pass skips its first batches without loading them.

    ``sampler`` is the inner sampler (mmengine's DistSamplerSeedHook sets its epoch)."""

    def __init__(self, batch_sampler, rank: int):
        self.batch_sampler = batch_sampler
        self.sampler = batch_sampler.sampler
        self.rank = rank
        self._start = 0

    def start_at(self, batches: int) -> None:
        """Begin the next pass after its first ``batches`` batches."""
        self._start = batches

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        start, self._start = self._start, 0
        seed = getattr(self.sampler, 'seed', 0) or 0
        epoch = getattr(self.sampler, 'epoch', 0)
        position = 0
        for number, batch in enumerate(self.batch_sampler):
            if number >= start:
                yield [SampleIndex(index, sample_seed(seed, self.rank, epoch, position + i))
                       for i, index in enumerate(batch)]
            position += len(batch)


def _load_seeded(dataset, indices: List[SampleIndex]) -> list:
    """The samples at ``indices``, each loaded with the generators seeded from its index
    (torch's batched-fetch protocol, ``Dataset.__getitems__``)."""
    samples = []
    for index in indices:
        seed_global_generators(index.seed)
        samples.append(dataset[int(index)])
    return samples


class SeedEachSample:
    """A ``worker_init_fn``: ``worker_init_fn`` (mmengine's seeds the worker), then each
    sample this worker loads is loaded with the generators seeded from its index."""

    def __init__(self, worker_init_fn: Optional[Callable[[int], None]]):
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)
        dataset = get_worker_info().dataset  # this worker's own copy
        dataset.__getitems__ = functools.partial(_load_seeded, dataset)


class _LazyIterator:
    """An iterator of a :class:`ResumableDataLoader` that starts (workers, prefetching) when
    its first batch is asked for, after the loader's pending :meth:`before_next_load`."""

    def __init__(self, loader: 'ResumableDataLoader'):
        self._loader = loader
        self._iterator = None

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self):
        if self._iterator is None:
            action, self._loader.pending_action = self._loader.pending_action, None
            if action is not None:
                action()
            self._iterator = DataLoader.__iter__(self._loader)
        return next(self._iterator)


class ResumableDataLoader(DataLoader):
    """A DataLoader with a :class:`ResumableBatchSampler` whose iterators start lazily."""

    pending_action: Optional[Callable[[], None]] = None

    @property
    def batch_size(self) -> Optional[int]:
        """The batch sampler's batch size (a DataLoader given a batch sampler has None;
        mmengine's ``scale_lr`` reads it)."""
        return getattr(self.batch_sampler.batch_sampler, 'batch_size', None)

    @batch_size.setter
    def batch_size(self, value) -> None:
        pass  # DataLoader.__init__ sets None

    def __iter__(self):
        return _LazyIterator(self)

    def before_next_load(self, action: Callable[[], None]) -> None:
        """Call ``action`` once, right before the next iterator loads its first batch."""
        self.pending_action = action


def resumable_loader(loader: DataLoader, seed: Optional[int]) -> DataLoader:
    """``loader`` (as mmengine's ``Runner.build_dataloader`` built it) as a
    :class:`ResumableDataLoader`; a loader without a batch sampler (an iterable dataset) is
    returned as it is."""
    if loader.batch_sampler is None:
        return loader
    generator = torch.Generator()
    generator.manual_seed(seed or 0)
    return ResumableDataLoader(
        loader.dataset, batch_sampler=ResumableBatchSampler(loader.batch_sampler, get_rank()),
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=SeedEachSample(loader.worker_init_fn),
        multiprocessing_context=loader.multiprocessing_context, generator=generator,
        prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device, in_order=loader.in_order)
