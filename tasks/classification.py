"""Classification: the head is the backbone's own linear head on the pooled feature (paper Sec. 4).

The task's face (tasks/__init__.py, :data:`TASK`): ``build_datasets``, ``build_model``, ``make_loss``, ``evaluate``,
``load_model`` and ``predict`` (the top-k classes of a user's images); ``info`` is the list of class names. Fixed and
flexified transfer differ only in the engine's patch-size sampler (one config key); distillation (Sec. 3.5), mixup,
label smoothing and the consistency term come from tasks/common/losses.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import flexivit
from tasks import Prediction, Task, ranked_predictions
from tasks.common import distributed
from tasks.common.datasets import build_dataset, class_subset, require_examples, take
from tasks.common.loader import JointTransform, eval_loader
from tasks.common.losses import consistency_loss, distillation_loss, mix, mixed_cross_entropy, mixup_ratio
from tasks.common.precision import autocast
from tasks.common.train_state import load_weights, resolve_checkpoint
from tasks.common.transforms import (
    ConsistentViews,
    as_value_range,
    data_eval_transform,
    eval_transform,
    train_transform,
)


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


def make_loss(config, info: list[str], teacher=None):
    """The loss of one (micro-)batch at a patch size: ``loss(net, batch, patch_size, step) -> (loss, terms)``.

    Cross-entropy to the labels (optionally mixed and smoothed), or with a ``teacher`` the distillation loss
    (Sec. 3.5: FunMatch, the teacher sees the same augmented, mixed crop, at its own resolution and patch size),
    plus the optional consistency term across patch sizes. The config is read here, once.
    """
    alpha, smoothing = config.train.mixup, config.train.label_smoothing
    weight, sizes, seed = config.train.consistency.weight, config.train.consistency.sizes, config.seed
    teacher_patch = config.distill.patch_size if teacher is not None else None

    def loss_fn(net, batch, patch_size, step: int) -> tuple[torch.Tensor, dict]:
        *views, labels = batch  # (images, labels), or (images, teacher images, labels) with a teacher view
        ratio = mixup_ratio(alpha) if alpha else None
        if ratio is not None:
            views = mix(ratio, *views)
        images = views[0]
        logits = net(images, patch_size=patch_size)
        terms = {}
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(views[-1], patch_size=teacher_patch)
            loss = terms["distill"] = distillation_loss(logits, teacher_logits)
        else:
            loss = terms["ce"] = mixed_cross_entropy(logits, labels, ratio, label_smoothing=smoothing)
        if weight:
            terms["consistency"] = consistency_loss(
                lambda size: net(images, patch_size=size), logits, sizes, seed=seed, step=step
            )
            loss = loss + weight * terms["consistency"]
        return loss, terms

    return loss_fn


@torch.no_grad()
@flexivit.in_eval_mode
def evaluate(
    model, val_set, patch_sizes: Sequence, device: torch.device, autocast_dtype=None, batch_size: int = 256
) -> dict:
    """Top-1 / top-5 accuracy and loss at each patch size, in one pass over ``val_set`` (split over ranks)."""
    loader = eval_loader(val_set, batch_size=batch_size, rank=distributed.rank(), world=distributed.world_size())
    sums = torch.zeros(len(patch_sizes), 4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for i, patch in enumerate(patch_sizes):
            with autocast(device, autocast_dtype):
                logits = model(images, patch_size=patch).float()
            top5 = logits.topk(min(5, logits.shape[-1]), -1).indices
            sums[i, 0] += (top5[:, 0] == labels).sum().item()
            sums[i, 1] += (top5 == labels[:, None]).any(-1).sum().item()
            sums[i, 2] += F.cross_entropy(logits, labels, reduction="sum").item()
            sums[i, 3] += len(labels)
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


def load_model(path: str | Path) -> flexivit.FlexiViT:
    """The trained classifier of a checkpoint the engine wrote (a file, or a workdir: its last one), from the file
    alone: a :class:`~flexivit.FlexiViT` built from its ``model_kwargs``, with its weights."""
    path = resolve_checkpoint(path)
    state, meta = flexivit.read_checkpoint(path)
    kwargs = meta.get("model_kwargs") or {}
    foreign = set(kwargs) - set(inspect.signature(flexivit.FlexiViT).parameters)
    if not kwargs.get("num_classes") or foreign:  # a task model holds its backbone under a key of its own
        raise flexivit.CheckpointError(
            f"{path} is not a classification checkpoint (a FlexiViT with a head): its model_kwargs are "
            f"{sorted(kwargs)}; is it another task's?"
        )
    model = flexivit.FlexiViT(**kwargs)
    return load_weights(model, state, path)


def predict(model, config, info: list[str], images, patch_size, options: dict) -> list[Prediction]:
    """The ``topk`` (default 3) most probable classes of each image, preprocessed as the validation images."""
    transform = data_eval_transform(config.data)
    device = next(model.parameters()).device
    x = torch.stack([transform(image) for image in images]).to(device)  # (B, C, S, S): every image at image_size
    with torch.no_grad():
        probs = model(x, patch_size=patch_size).float().softmax(-1)  # (B, K)
    return ranked_predictions(probs, info, options.get("topk", 3), name="class", score="prob", fmt=".2f")


TASK = Task(
    name="classification",
    build_datasets=build_datasets,
    build_model=build_model,
    make_loss=make_loss,
    evaluate=evaluate,
    load_model=load_model,
    predict=predict,
    predict_options=("topk",),
    engine_features=frozenset({"consistency", "distill", "mixup"}),
    runlocal="configs/classification/fashion_mnist.py:runlocal",
)
