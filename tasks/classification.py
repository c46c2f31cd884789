"""Classification: the head is the backbone's own linear head on the pooled feature (paper Sec. 4).

The task's face for the engine: ``build_datasets``, ``build_model``, ``loss`` and ``evaluate``. Fixed and
flexified transfer differ only in the engine's patch-size sampler (one config key).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

import flexivit
from tasks.common import distributed
from tasks.common.datasets import build_dataset, class_subset, take
from tasks.common.transforms import eval_transform, train_transform


def build_datasets(data) -> tuple:
    """``(train dataset, train transform, validation dataset with its eval transform applied, class names)``.

    ``data.classes`` keeps only those classes (relabelled 0..k-1), e.g. to pretrain on some Fashion-MNIST
    classes and transfer to the others; ``data.train_examples`` / ``data.val_examples`` take a fixed random subset.
    """
    common = dict(value_range=tuple(data.value_range) if isinstance(data.value_range, list) else data.value_range)
    train_tf = train_transform(
        data.image_size, crop_scale=tuple(data.crop_scale), hflip=data.hflip, randaugment=data.randaugment, **common
    )
    val_tf = eval_transform(data.image_size, crop_ratio=data.eval_crop_ratio, **common)
    train = build_dataset(data.name, data.train_split, root=data.root)
    val = build_dataset(data.name, data.val_split, root=data.root, transform=val_tf)
    if data.classes:
        train, val = class_subset(train, data.classes), class_subset(val, data.classes)
    if data.train_examples:
        train = take(train, data.train_examples, seed=0)
    if data.val_examples:
        val = take(val, data.val_examples, seed=0)
    return train, train_tf, val, list(train.classes)


def build_model(model_cfg, num_classes: int) -> flexivit.FlexiViT:
    """The backbone with a head of ``num_classes``; ``model_cfg.init`` loads weights (npz, timm, ours)."""
    overrides = dict(model_cfg.overrides or {})
    overrides.setdefault("num_classes", num_classes)
    return flexivit.create_model(model_cfg.name, pretrained=model_cfg.init or None, **overrides)


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with the batch reversed (one ratio per batch, from Beta(alpha, alpha)); soft targets."""
    ratio = torch.distributions.Beta(alpha, alpha).sample().item()
    return ratio * images + (1 - ratio) * images.flip(0), ratio * targets + (1 - ratio) * targets.flip(0)


def loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy with (soft or hard) labels; with a teacher, cross-entropy to its predictions (Sec. 3.5).

    Distillation uses the teacher's distribution as the target, as big_vision's distill trainer does; this is
    KL(teacher || student) up to the teacher's entropy, a constant. Computed in float32 under autocast.
    """
    logits = logits.float()
    if teacher_logits is not None:
        return torch.sum(-F.softmax(teacher_logits.float(), -1) * F.log_softmax(logits, -1), -1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model, loader, patch_sizes: Sequence, device: torch.device, autocast_dtype=None) -> dict:
    """Top-1 / top-5 accuracy and loss at each patch size, in one pass over ``loader`` (summed over ranks)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(patch_sizes), 4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for i, patch in enumerate(patch_sizes):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(images, patch_size=patch).float()
            top5 = logits.topk(min(5, logits.shape[-1]), -1).indices
            sums[i, 0] += (top5[:, 0] == labels).sum().item()
            sums[i, 1] += (top5 == labels[:, None]).any(-1).sum().item()
            sums[i, 2] += F.cross_entropy(logits, labels, reduction="sum").item()
            sums[i, 3] += len(labels)
    model.train(was_training)
    sums = distributed.all_reduce_sum(sums)
    return {
        patch: {
            "top1": (s[0] / s[3]).item(),
            "top5": (s[1] / s[3]).item(),
            "loss": (s[2] / s[3]).item(),
            "n": int(s[3]),
        }
        for patch, s in zip(patch_sizes, sums, strict=True)
    }
