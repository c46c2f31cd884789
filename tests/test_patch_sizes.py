"""Patch-size samplers: deterministic in (seed, step), right distribution, curricula switch on time."""

from collections import Counter

import numpy as np
import pytest

from flexivit import (
    PAPER_PATCH_SIZES,
    CurriculumSampler,
    FixedSampler,
    UniformSampler,
    WeightedSampler,
    build_sampler,
    tiling_patch_sizes,
)


def test_paper_set_is_every_tiling_size_between_8_and_48():
    assert tiling_patch_sizes(240, 8, 48) == PAPER_PATCH_SIZES
    assert [240 // p for p in PAPER_PATCH_SIZES] == [5, 6, 8, 10, 12, 15, 16, 20, 24, 30]


def test_same_seed_and_step_same_size_in_any_order():
    a, b = UniformSampler(seed=3), UniformSampler(seed=3)
    forward = [a(s) for s in range(200)]
    backward = [b(s) for s in reversed(range(200))][::-1]
    assert forward == backward  # a pure function of (seed, step): a resumed run or another rank agrees
    assert forward != [UniformSampler(seed=4)(s) for s in range(200)]
    assert len(set(forward)) == len(PAPER_PATCH_SIZES)


def test_uniform_and_weighted_distributions():
    n = 20000
    counts = Counter(UniformSampler(seed=0)(s) for s in range(n))
    assert max(abs(c / n - 0.1) for c in counts.values()) < 0.01
    sampler = WeightedSampler([8, 16, 32], [1, 2, 5], seed=1)
    counts = Counter(sampler(s) for s in range(n))
    np.testing.assert_allclose([counts[8] / n, counts[16] / n, counts[32] / n], [1 / 8, 2 / 8, 5 / 8], atol=0.012)
    assert WeightedSampler([8, 16], [0, 1])(5) == 16


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        WeightedSampler([8, 16], [1, -1])
    with pytest.raises(ValueError, match="one per size"):
        WeightedSampler([8, 16], [1])


def test_curriculum_switches_at_the_boundaries():
    sampler = CurriculumSampler([FixedSampler(48), FixedSampler(30), UniformSampler([8, 10])], [100, 250])
    assert [sampler(s) for s in (0, 99)] == [48, 48]
    assert [sampler(s) for s in (100, 249)] == [30, 30]
    assert {sampler(s) for s in range(250, 400)} == {8, 10}
    assert sampler.sizes == (48, 30, 10, 8)


def test_curriculum_with_a_function_and_from_config():
    sampler = CurriculumSampler([FixedSampler(48), FixedSampler(8)], lambda step: step % 2)
    assert [sampler(s) for s in range(4)] == [48, 8, 48, 8]
    built = build_sampler(
        "curriculum",
        seed=7,
        stages=[(0, {"kind": "fixed", "sizes": [40]}), (10, {"kind": "uniform", "sizes": [8, 16]})],
    )
    assert built(9) == 40 and built(10) in (8, 16)
    assert build_sampler("uniform", sizes=[8, 16], seed=7)(10) == built(10)  # stages inherit the seed


def test_build_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler kind 'random'"):
        build_sampler("random")
    with pytest.raises(ValueError, match="one patch size"):
        build_sampler("fixed", sizes=[8, 16])
