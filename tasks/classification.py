"""Classification: the head is the backbone's own linear head on the pooled feature (paper Sec. 4).

The task's face for the engine (tasks/__init__.py): ``build_datasets``, ``build_model``, ``train_loss`` and
``evaluate``. Fixed and flexified transfer differ only in the engine's patch-size sampler (one config key);
distillation (Sec. 3.5), mixup, label smoothing and the consistency term come from tasks/common/losses.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

import flexivit
from tasks.common import distributed
from tasks.common.datasets import build_dataset, class_subset, require_examples, take
from tasks.common.loader import JointTransform, eval_loader
from tasks.common.losses import consistency_loss, distillation_loss, mix, mixed_cross_entropy, mixup_ratio
from tasks.common.train_state import resolve_checkpoint
from tasks.common.transforms import ConsistentViews, as_value_range, eval_transform, train_transform


def build_datasets(data, distill=None) -> tuple:
    """``(train dataset, train transform, validation dataset with its eval transform applied, class names)``.

    ``data.classes`` keeps only those classes (relabelled 0..k-1), e.g. to pretrain on some Fashion-MNIST
    classes and transfer to the others; ``data.train_examples`` / ``data.val_examples`` take a fixed random subset.
    With a ``distill`` block whose teacher runs at another ``image_size``, every training item also carries the
    teacher's view: the same crop and flip resized to that size (``(image, teacher image, label)``).
    """
    value_range = as_value_range(data.value_range)
    teacher_size = distill.image_size if distill and distill.image_size not in (None, data.image_size) else None
    if teacher_size is None:
        train_tf = train_transform(
            data.image_size,
            crop_scale=tuple(data.crop_scale),
            hflip=data.hflip,
            randaugment=data.randaugment,
            value_range=value_range,
        )
    else:
        if data.randaugment:
            raise ValueError("data.randaugment cannot give the teacher a consistent view: turn it off to distil")
        views = ConsistentViews(
            (data.image_size, teacher_size),
            crop_scale=tuple(data.crop_scale),
            hflip=data.hflip,
            value_range=value_range,
        )
        train_tf = JointTransform(lambda image, label: (*views(image), label))
    val_tf = eval_transform(data.image_size, crop_ratio=data.eval_crop_ratio, value_range=value_range)
    train = build_dataset(data.name, data.train_split, root=data.root)
    val = build_dataset(data.name, data.val_split, root=data.root, transform=val_tf)
    if data.classes:
        train, val = class_subset(train, data.classes), class_subset(val, data.classes)
    if data.train_examples:
        train = take(train, data.train_examples, seed=0)
    if data.val_examples:
        val = take(val, data.val_examples, seed=0)
    subset = f" with data.classes={list(data.classes)}" if data.classes else ""
    require_examples(train, f"data.train_split={data.train_split!r} of {data.name}{subset}")
    require_examples(val, f"data.val_split={data.val_split!r} of {data.name}{subset}")
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


def train_loss(net, batch, patch_size, *, step: int, config, teacher=None) -> tuple[torch.Tensor, dict]:
    """``(loss, {term: value})`` of one (micro-)batch at ``patch_size``.

    Cross-entropy to the labels (optionally mixed and smoothed), or with a ``teacher`` the distillation loss
    (Sec. 3.5: FunMatch, the teacher sees the same augmented, mixed crop, at its own resolution and patch size),
    plus the optional consistency term across patch sizes.
    """
    *views, labels = batch  # (images, labels), or (images, teacher images, labels) with a teacher view
    train = config.train
    ratio = mixup_ratio(train.mixup) if train.mixup else None
    if ratio is not None:
        views = mix(ratio, *views)
    images = views[0]
    logits = net(images, patch_size=patch_size)
    terms = {}
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(views[-1], patch_size=config.distill.patch_size)
        loss = terms["distill"] = distillation_loss(logits, teacher_logits)
    else:
        loss = terms["ce"] = mixed_cross_entropy(logits, labels, ratio, label_smoothing=train.label_smoothing)
    if train.consistency.weight:
        terms["consistency"] = consistency_loss(
            lambda size: net(images, patch_size=size),
            logits,
            train.consistency.sizes,
            seed=config.seed,
            step=step,
        )
        loss = loss + train.consistency.weight * terms["consistency"]
    return loss, terms


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
