"""OWL-ViT's federated query sets (docs/reference.md §8): each training image is queried with its positive classes,
its verified negatives (LVIS ``neg_category_ids``) and random negatives drawn by class frequency, padded to a fixed
number of slots; the excluded (rare) classes never enter.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .data import DetectionDataset, class_mask


def frequency_weights(dataset: DetectionDataset, power: float = 0.5) -> torch.Tensor:
    """Random-negative weights (C,) = max(image_count, 1) ** ``power``.

    detectron2's federated loss (Zhou et al. 2021, CenterNet2) draws its negative classes with probability
    ∝ image_count ** 0.5: frequent classes are the likeliest confusions and so the most useful negatives, while the
    square root keeps the long tail from vanishing; the floor of 1 keeps classes unseen in training drawable.
    Excluded (rare) classes get weight 0.
    """
    weights = torch.as_tensor(np.maximum(dataset.image_count, 1), dtype=torch.float64) ** power
    weights[list(dataset.excluded)] = 0.0
    return weights


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _indices(values, num_classes: int, what: str) -> torch.Tensor:
    """Class indices from a list / tensor of indices or a (C,) bool mask, unique and sorted."""
    t = torch.as_tensor(values if not isinstance(values, set | frozenset) else sorted(values))
    if t.dtype == torch.bool:
        if t.shape != (num_classes,):
            raise ValueError(f"{what} mask has shape {tuple(t.shape)}; expected ({num_classes},)")
        return t.nonzero().flatten()
    t = t.to(torch.int64).flatten().unique()
    if len(t) and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"{what} holds class indices outside 0..{num_classes - 1}: {t.tolist()}")
    return t


def sample_queries(
    positives,
    negatives,
    num_queries: int,
    class_weights,
    excluded=(),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's federated query set: ``(queries (Q,) int64 class indices, -1 padded; valid (Q,) bool)``.

    All positives, then the verified negatives, then random negatives without replacement with probability
    ∝ ``class_weights`` among the classes not yet in the set and not ``excluded`` (zero-weight classes never), up to
    ``num_queries``. Excluded classes never enter, even as positives. Too many positives or verified negatives: a
    random subset of them (warned once). For an exhaustive dataset (COCO) pass no verified negatives: every
    non-positive class is then a candidate. The valid slots are shuffled (their order would otherwise say which
    queries are the positives); the padding follows them. All draws use ``generator`` (None: torch's global RNG).
    """
    weights = torch.as_tensor(class_weights, dtype=torch.float64)
    c = len(weights)
    out = class_mask(_indices(excluded, c, "excluded").tolist(), c)
    pos = _indices(positives, c, "positives")
    pos = pos[~out[pos]]
    if len(pos) > num_queries:
        _warn_once("pos", f"{len(pos)} positive classes exceed num_queries={num_queries}: keeping a random subset")
        pos = pos[torch.randperm(len(pos), generator=generator)[:num_queries]]
    taken = out.clone()
    taken[pos] = True
    neg = _indices(negatives, c, "negatives")
    neg = neg[~taken[neg]]
    room = num_queries - len(pos)
    if len(neg) > room:
        _warn_once("neg", f"positives + verified negatives exceed num_queries={num_queries}: keeping a random subset")
        neg = neg[torch.randperm(len(neg), generator=generator)[:room]]
    taken[neg] = True
    room -= len(neg)
    candidates = (~taken & (weights > 0)).nonzero().flatten()
    extra = candidates[:0]
    if room > 0 and len(candidates):
        k = min(room, len(candidates))
        extra = candidates[torch.multinomial(weights[candidates], k, replacement=False, generator=generator)]
    chosen = torch.cat([pos, neg, extra])
    chosen = chosen[torch.randperm(len(chosen), generator=generator)]
    queries = torch.full((num_queries,), -1, dtype=torch.int64)
    queries[: len(chosen)] = chosen
    return queries, torch.arange(num_queries) < len(chosen)
