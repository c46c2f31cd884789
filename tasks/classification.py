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
from tasks.common.loader import eval_loader
from tasks.common.train_state import resolve_checkpoint
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


def build_model(model_cfg, classes: list[str]) -> flexivit.FlexiViT:
    """The backbone with a head for ``classes``.

    ``model_cfg.init`` loads weights: a release name, a .npz / timm / own file, or a training workdir (its last
    checkpoint). ``model_cfg.new_head`` replaces the loaded head by a zero-initialised one (transfer to new classes).
    """
    num_classes = len(classes)
    overrides = dict(model_cfg.overrides or {})
    overrides.setdefault("num_classes", num_classes)
    init = resolve_checkpoint(model_cfg.init) if model_cfg.init else None
    model = flexivit.create_model(model_cfg.name, pretrained=init, **overrides)
    if model_cfg.new_head:
        model.reset_classifier(num_classes)
    return model


def loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    label_smoothing: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy to hard labels, or to a teacher's predicted distribution (distillation, Sec. 3.5).

    With a teacher this is big_vision's distillation loss: KL(teacher || student) up to the teacher's entropy, a
    constant. Computed in float32 under autocast.
    """
    logits = logits.float()
    if teacher_logits is not None:
        return torch.sum(-F.softmax(teacher_logits.float(), -1) * F.log_softmax(logits, -1), -1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def train_loss(net, batch, patch_size, *, step: int, config, teacher=None) -> torch.Tensor:
    """The loss of one (micro-)batch at ``patch_size``: labels or teacher, optional mixup and consistency term."""
    images, labels = batch
    train = config.train
    ratio = None
    if train.mixup:  # mix each example with the batch reversed, one Beta(alpha, alpha) ratio per batch
        ratio = torch.distributions.Beta(train.mixup, train.mixup).sample().item()
        images = ratio * images + (1 - ratio) * images.flip(0)
    logits = net(images, patch_size=patch_size)
    if teacher is not None:
        # FunMatch: the teacher sees the exact same (augmented, mixed) images, at its own resolution and patch size.
        with torch.no_grad():
            teacher_logits = teacher(_resize(images, config.distill.image_size), patch_size=config.distill.patch_size)
        value = loss(logits, None, teacher_logits=teacher_logits)
    elif ratio is not None:
        smooth = train.label_smoothing
        value = ratio * loss(logits, labels, label_smoothing=smooth) + (1 - ratio) * loss(
            logits, labels.flip(0), label_smoothing=smooth
        )
    else:
        value = loss(logits, labels, label_smoothing=train.label_smoothing)
    if train.consistency.weight:
        # Keeps the patch sizes consistent while fine-tuning at one of them (REFERENCE.md §12): the model's own
        # prediction at the training size, detached, is the target at another size drawn from (seed + 1, step).
        other_size = flexivit.UniformSampler(train.consistency.sizes, seed=config.seed + 1)(step)
        other = net(images, patch_size=other_size)
        value = value + train.consistency.weight * loss(other, None, teacher_logits=logits.detach())
    return value


def _resize(images: torch.Tensor, size) -> torch.Tensor:
    if not size or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def evaluate(
    model, val_set, patch_sizes: Sequence, device: torch.device, autocast_dtype=None, batch_size: int = 256
) -> dict:
    """Top-1 / top-5 accuracy and loss at each patch size, in one pass over ``val_set`` (split over ranks)."""
    loader = eval_loader(val_set, batch_size=batch_size, rank=distributed.rank(), world=distributed.world_size())
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
