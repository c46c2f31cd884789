"""Loss pieces that several tasks share: mixup, soft-target cross-entropy (distillation), the consistency term.

Each is a small function of explicit arguments; a task's ``make_loss`` composes them from its config, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import flexivit


def mixup_ratio(alpha: float) -> float:
    """One Beta(alpha, alpha) mixing ratio for a batch, from the global RNG (which the engine seeds per step)."""
    return torch.distributions.Beta(alpha, alpha).sample().item()


def mix(ratio: float, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mix each example with the batch reversed: ``ratio * x + (1 - ratio) * x.flip(0)``, for every tensor given.

    Mixing with the reversed batch needs no permutation to be drawn or communicated; several views of the same
    batch (the student's and the teacher's images) get the same pairs and ratio, as FunMatch requires.
    """
    return tuple(ratio * t + (1 - ratio) * t.flip(0) for t in tensors)


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ratio: float | None = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy in float32 to hard labels, or, for a batch mixed by :func:`mix`, to the same mix of its labels."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if ratio is None:
        return loss
    return ratio * loss + (1 - ratio) * F.cross_entropy(logits, labels.flip(0), label_smoothing=label_smoothing)


def soft_cross_entropy(
    logits: torch.Tensor, target_probs: torch.Tensor, dim: int = -1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum(p * log_softmax(logits))`` over ``dim``, averaged over the other positions (or the ``valid`` ones).

    With ``p = softmax(teacher_logits)`` this is KL(teacher || student) up to the teacher's entropy, a constant:
    big_vision's distillation loss (paper Sec. 3.5). Computed in float32.
    """
    per_position = -(target_probs.float() * F.log_softmax(logits.float(), dim)).sum(dim)
    if valid is None:
        return per_position.mean()
    return per_position[valid].sum() / valid.sum().clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Cross-entropy of the student to the teacher's predicted distribution (paper Sec. 3.5)."""
    return soft_cross_entropy(student_logits, F.softmax(teacher_logits.float(), dim), dim)


def consistency_loss(
    forward: Callable[[int | tuple], torch.Tensor],
    reference_logits: torch.Tensor,
    sizes: Sequence,
    *,
    seed: int,
    step: int,
    dim: int = -1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the patch sizes consistent while training at one of them (docs/reference.md §12).

    ``forward(p)`` predicts at a second size ``p`` drawn from ``sizes`` with the sampler seeded by ``(seed + 1,
    step)`` (independent of the training size's own draw, identical on every rank); its prediction is pulled towards
    the detached ``reference_logits`` at the training size by :func:`soft_cross_entropy` over ``dim`` (per
    position, over the ``valid`` ones for dense tasks). A second forward and backward per step.
    """
    other_size = flexivit.UniformSampler(list(sizes), seed=seed + 1)(step)
    target = F.softmax(reference_logits.detach().float(), dim)
    return soft_cross_entropy(forward(other_size), target, dim, valid)
