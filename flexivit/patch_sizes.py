"""Patch-size samplers: which patch size a training step uses (paper Sec. 3.3, Sec. 5.4, Appendix C).

A sampler is a pure function of ``(seed, step)``: every data-parallel rank draws the same size at the same
step without communicating, and a resumed run draws the same sequence as an uninterrupted one. (Drawing from
a process-local RNG inside ``forward`` makes ranks disagree; the reference draws one size per step.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# The paper's set at 240 px: every patch size between 48 and 8 that tiles the image (Sec. 3.3).
PAPER_PATCH_SIZES: tuple[int, ...] = (48, 40, 30, 24, 20, 16, 15, 12, 10, 8)


def tiling_patch_sizes(image_size: int, smallest: int = 1, largest: int | None = None) -> tuple[int, ...]:
    """Patch sizes in ``[smallest, largest]`` that tile ``image_size`` exactly, largest first."""
    largest = image_size if largest is None else largest
    return tuple(p for p in range(largest, smallest - 1, -1) if image_size % p == 0)


def patch_size_name(patch) -> str:
    """``"16"`` or ``"8x16"`` (height x width): a name that tells every patch size apart, e.g. in file names."""
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return str(ph) if ph == pw else f"{ph}x{pw}"


def _rng(seed: int, step: int) -> np.random.Generator:
    # SeedSequence mixes both integers: neighbouring steps and seeds give independent streams.
    return np.random.default_rng([seed, step])


class FixedSampler:
    """Always the same patch size (standard ViT training or fixed transfer)."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size
        self.sizes = (patch_size,)

    def __call__(self, step: int) -> int:
        return self.patch_size

    def __repr__(self) -> str:
        return f"FixedSampler({self.patch_size})"


class WeightedSampler:
    """One size per step from ``sizes`` with probabilities proportional to ``weights``."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None, seed: int = 0):
        if not sizes:
            raise ValueError("a sampler needs at least one patch size")
        weights = np.ones(len(sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(weights) != len(sizes) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights {list(weights)} must be non-negative, not all zero, one per size {list(sizes)}")
        self.sizes = tuple(int(s) for s in sizes)
        self.probs = weights / weights.sum()
        self.seed = seed

    def __call__(self, step: int) -> int:
        return self.sizes[_rng(self.seed, step).choice(len(self.sizes), p=self.probs)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, probs={np.round(self.probs, 3).tolist()}, seed={self.seed})"


class UniformSampler(WeightedSampler):
    """One size per step, uniformly from ``sizes`` (the paper's default)."""

    def __init__(self, sizes: Sequence[int] = PAPER_PATCH_SIZES, seed: int = 0):
        super().__init__(sizes, weights=None, seed=seed)


class CurriculumSampler:
    """A sequence of samplers and a map from step to which one is active (Sec. 5.4).

    ``stage`` is either the sorted steps at which the next sampler takes over (``[1000, 5000]`` with three
    samplers: the first until step 999, the second until 4999, then the third) or any function
    ``step -> index``.
    """

    def __init__(self, samplers: Sequence, stage: Sequence[int] | Callable[[int], int]):
        self.samplers = list(samplers)
        if callable(stage):
            self._stage = stage
        else:
            boundaries = list(stage)
            if len(boundaries) != len(self.samplers) - 1 or boundaries != sorted(boundaries):
                raise ValueError(
                    f"need {len(self.samplers) - 1} sorted boundaries for {len(self.samplers)} samplers, "
                    f"got {boundaries}"
                )
            self._stage = lambda step: int(np.searchsorted(boundaries, step, side="right"))
        self.sizes = tuple(sorted({s for sampler in self.samplers for s in sampler.sizes}, reverse=True))

    def stage(self, step: int) -> int:
        index = self._stage(step)
        if not 0 <= index < len(self.samplers):
            raise IndexError(f"curriculum stage {index} at step {step} is outside 0..{len(self.samplers) - 1}")
        return index

    def __call__(self, step: int) -> int:
        return self.samplers[self.stage(step)](step)

    def __repr__(self) -> str:
        return f"CurriculumSampler({self.samplers})"


def build_sampler(kind: str, *, sizes: Sequence[int] | None = None, weights=None, seed: int = 0, stages=None):
    """A sampler from plain values, for configs: ``kind`` in fixed / uniform / weighted / curriculum.

    ``sizes`` defaults to the paper's set. ``curriculum`` takes ``stages=[(start_step, {"kind": ..., "sizes": ...}),
    ...]`` starting at step 0; it draws from its stages, so a ``sizes`` given with it must be its last stage's sizes
    (an override of ``sizes`` alone would otherwise be ignored). ``stages`` and ``weights`` given to a kind that
    does not read them are refused for the same reason.
    """
    if stages is not None and kind != "curriculum":
        raise ValueError(f"stages are only read by a curriculum sampler, not by kind {kind!r}")
    if weights is not None and kind != "weighted":
        raise ValueError(f"weights are only read by a weighted sampler, not by kind {kind!r}")
    if kind != "curriculum":
        sizes = PAPER_PATCH_SIZES if sizes is None else sizes
    if kind == "fixed":
        if len(sizes) != 1:
            raise ValueError(f"a fixed sampler takes one patch size, got {list(sizes)}")
        return FixedSampler(sizes[0])
    if kind == "uniform":
        return UniformSampler(sizes, seed)
    if kind == "weighted":
        return WeightedSampler(sizes, weights, seed)
    if kind == "curriculum":
        if not stages or stages[0][0] != 0:
            raise ValueError(f"a curriculum needs stages [(0, spec), (step, spec), ...], got {stages}")
        samplers = [build_sampler(**{"seed": seed, **spec}) for _, spec in stages]
        if sizes is not None and sorted(sizes) != sorted(samplers[-1].sizes):
            raise ValueError(
                f"sizes {list(sizes)} are not the curriculum's: it draws from its stages, the last one from "
                f"{list(samplers[-1].sizes)}; change the stages instead"
            )
        return CurriculumSampler(samplers, [start for start, _ in stages[1:]])
    raise ValueError(f"unknown sampler kind {kind!r}; use fixed, uniform, weighted or curriculum")
