"""The training sampler: batches as pure functions of (seed, step, rank), drawn once per epoch."""

import numpy as np
import pytest

from tasks.common import loader
from tasks.common.loader import StepBatches


def reference_batch(num_items, global_batch, seed, rank, world, step):
    # The definition, restated: epoch permutation and item seeds from (seed, epoch), this rank's slice of the batch.
    epoch, position = divmod(step, num_items // global_batch)
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    seeds = np.random.default_rng([seed, epoch, 1]).integers(0, 2**62, size=num_items)
    per_rank = global_batch // world
    indices = order[position * global_batch + rank * per_rank :][:per_rank]
    return [(int(i), int(seeds[i])) for i in indices]


@pytest.mark.parametrize("world", [1, 2])
def test_batches_follow_the_definition_across_epochs_and_ranks(world):
    for rank in range(world):
        sampler = StepBatches(103, 10, seed=3, rank=rank, world=world)
        for step in [0, 1, 9, 10, 11, 25, 7]:  # 10 steps per epoch (3 items dropped); out of order on purpose
            assert sampler.batch_for_step(step) == reference_batch(103, 10, 3, rank, world, step), (rank, step)
    whole = StepBatches(103, 10, seed=3).batch_for_step(4)
    halves = [StepBatches(103, 10, seed=3, rank=r, world=2).batch_for_step(4) for r in range(2)]
    assert halves[0] + halves[1] == whole  # the ranks split the global batch, nothing repeated or lost


def test_the_epoch_is_drawn_once_not_every_step(monkeypatch):
    # Drawing the permutation and the item seeds each step cost ~0.3 s and 200 MB at 13M items; per epoch it is O(N)
    # once and O(batch) per step (python -m tools.benchmarks.sampler measures both).
    calls = []
    real = np.random.default_rng
    monkeypatch.setattr(loader.np.random, "default_rng", lambda seed: (calls.append(seed), real(seed))[1])
    sampler = StepBatches(1000, 10, seed=0)  # 100 steps per epoch
    for step in range(250):
        sampler.batch_for_step(step)
    assert calls == [[0, 0], [0, 0, 1], [0, 1], [0, 1, 1], [0, 2], [0, 2, 1]]


def test_sampler_errors_name_the_numbers():
    with pytest.raises(ValueError, match="global batch 10 is not divisible by the 3 processes"):
        StepBatches(100, 10, seed=0, world=3)
    with pytest.raises(ValueError, match="dataset of 5 items is smaller than one batch of 10"):
        StepBatches(5, 10, seed=0)
