"""Training data order and augmentation randomness as pure functions of (seed, step).

The engine can then resume in the middle of an epoch and reproduce an uninterrupted run exactly, whatever the
number of DataLoader workers: the batch of step ``s`` is determined by ``(seed, s)``, each rank takes its slice
of the global batch, and every item carries its own augmentation seed (derived from ``(seed, epoch, index)``)
into ``__getitem__``, where the random transform runs under that seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class JointTransform:
    """Marks a train transform that maps the whole item to an item, e.g. ``(image, mask) -> (image, mask)``.

    Without it, :class:`SeededItems` applies the transform to the first element (the image) only.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item: tuple) -> tuple:
        return tuple(self.fn(*item))


class SeededItems(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` applies ``transform`` with the CPU RNG seeded by ``seed``.

    The transform sees the image (the item's first element), or the whole item if it is a :class:`JointTransform`.
    """

    def __init__(self, dataset: Dataset, transform=None):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        # DataLoader fetches a whole batch through this hook: fork the global RNG once per batch (it costs as much
        # as a transform), so the training process's own random stream (dropout, mixup) is left untouched.
        with torch.random.fork_rng(devices=[]):
            out = []
            for index, seed in items:
                item = tuple(self.dataset[index])
                if self.transform is not None:
                    # The CPU generator alone: torch.manual_seed also queues a CUDA seeding that records a stack
                    # trace, which costs more than the transform itself. Transforms run on the CPU.
                    torch.default_generator.manual_seed(seed)
                    if isinstance(self.transform, JointTransform):
                        item = self.transform(item)
                    else:
                        item = (self.transform(item[0]), *item[1:])
                out.append(item)
        return out


class StepBatches(Sampler):
    """Yields this rank's ``(index, seed)`` lists for steps ``start_step, start_step + 1, ...`` (endless).

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; step ``s`` takes global batch ``s % steps_per_epoch``
    of epoch ``s // steps_per_epoch`` (the incomplete last batch is dropped) and rank ``r`` its ``r``-th slice.
    The permutation and the items' augmentation seeds are drawn once per epoch and kept: a step costs O(batch)
    (at ImageNet-21k's 13M images, drawing them per step cost ~0.3 s and 200 MB;
    ``python -m tools.benchmarks.sampler`` measures it).
    """

    def __init__(
        self, num_items: int, global_batch: int, *, seed: int, rank: int = 0, world: int = 1, start_step: int = 0
    ):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        if num_items < global_batch:
            raise ValueError(f"dataset of {num_items} items is smaller than one batch of {global_batch}")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self.steps_per_epoch = num_items // global_batch
        self._epoch: int | None = None
        self._order = self._item_seeds = np.empty(0, np.int64)

    def _draw_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._item_seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**62, size=self.num_items)
            self._epoch = epoch

    def batch_for_step(self, step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        self._draw_epoch(epoch)
        per_rank = self.global_batch // self.world
        start = position * self.global_batch + self.rank * per_rank
        indices = self._order[start : start + per_rank]
        return list(zip(indices.tolist(), self._item_seeds[indices].tolist(), strict=True))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_for_step(step)
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for progress estimates
        return 2**31


def train_loader(
    dataset: Dataset,
    transform,
    *,
    global_batch: int,
    seed: int,
    rank: int,
    world: int,
    start_step: int,
    num_workers: int = 0,
    collate_fn=None,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader of this rank's batches from ``start_step`` on (``collate_fn``: the task's, or torch's).

    ``pin_memory`` (the engine sets it when it trains on a GPU): batches come in page-locked memory, so that
    ``.to(device, non_blocking=True)`` is a copy the GPU makes while the host goes on; from pageable memory it is not.
    The workers stay alive across epochs (the loader is endless: there is one "epoch").
    """
    batches = StepBatches(len(dataset), global_batch, seed=seed, rank=rank, world=world, start_step=start_step)
    return DataLoader(
        SeededItems(dataset, transform),
        batch_sampler=batches,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
    )


# What eval_loader uses when its caller does not say: the entry point sets it from its config for the evaluations it
# runs (eval_loading), since the task evaluators that build the loaders take no config (tasks/__init__.py).
_EVAL_LOADING = {"num_workers": 0, "pin_memory": False}


@contextlib.contextmanager
def eval_loading(*, num_workers: int, pin_memory: bool):
    """Within the block, evaluation loaders read with ``num_workers`` worker processes (data.num_workers) and hand
    out page-locked batches when ``pin_memory`` (a GPU evaluates); outside it, in the main process, unpinned."""
    saved = dict(_EVAL_LOADING)
    _EVAL_LOADING.update(num_workers=num_workers, pin_memory=pin_memory)
    try:
        yield
    finally:
        _EVAL_LOADING.update(saved)


def eval_loader(
    dataset: Dataset, *, batch_size: int, rank: int = 0, world: int = 1, num_workers: int | None = None
) -> DataLoader:
    """Every item exactly once, split across ranks in contiguous interleaved slices (no padding duplicates).

    ``num_workers`` None: the setting of the enclosing :func:`eval_loading` (0 outside one).
    """
    indices = list(range(rank, len(dataset), world))
    return DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=_EVAL_LOADING["num_workers"] if num_workers is None else num_workers,
        pin_memory=_EVAL_LOADING["pin_memory"],
    )
