"""Semantic segmentation: Segmenter's linear decoder on FlexiViT, evaluated by mIoU at every patch size (paper Sec. 4).

The task's face (tasks/__init__.py, :data:`TASK`): ``build_datasets``, ``build_model``, ``make_loss``, ``evaluate``,
``load_model``, ``predict`` (a colour mask and its legend for a user's image), ``image_forward`` and ``token_grid``
(Segmenter pads); ``info`` is the list of class names. Fixed and flexified transfer differ only in the engine's
patch-size sampler; fast transfer is fixed transfer at a large patch size evaluated at all of them.

    model.py       the linear decoder, padding to a multiple of the patch size, backbone + decoder
    inference.py   whole-image / sliding-window inference, flip and multi-scale
    metrics.py     confusion matrix, per-class IoU, mIoU, mAcc, aAcc (mmseg's IoUMetric definitions)
    data.py        ADE20k, Cityscapes and image + PNG folder datasets
    transforms.py  the mmseg train pipeline on image and mask together (torchvision v2), eval resize
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Subset

import flexivit
from tasks import Prediction, Task
from tasks.common import distributed
from tasks.common.loader import JointTransform
from tasks.common.losses import consistency_loss
from tasks.common.precision import autocast
from tasks.common.scenes import ensure_generated
from tasks.common.train_state import load_weights, resolve_checkpoint
from tasks.common.transforms import as_value_range

from .data import IGNORE_INDEX, build_segmentation_dataset
from .inference import InferenceSettings
from .inference import predict as predict_scores
from .metrics import confusion_matrix, segmentation_metrics
from .model import LinearDecoder, Segmenter
from .transforms import EvalTransform, TrainTransform

__all__ = [
    "IGNORE_INDEX",
    "TASK",
    "InferenceSettings",
    "LinearDecoder",
    "Segmenter",
    "build_datasets",
    "build_model",
    "confusion_matrices",
    "evaluate",
    "image_forward",
    "legend_image",
    "load_model",
    "make_loss",
    "palette",
    "predict",
    "segmentation_metrics",
    "token_grid",
]


def _pair_or_none(value) -> tuple[int, int] | None:
    return None if value is None else tuple(value)


def build_datasets(data, distill=None) -> tuple:
    """``(train set, joint train transform, validation set with its eval transform applied, class names)``."""
    ensure_generated(data.name, data.root, data.generate)
    options = dict(data.folder or {}, classes=data.classes)
    value_range = as_value_range(data.value_range)
    train_tf = TrainTransform(
        crop=data.image_size,
        scale=_pair_or_none(data.scale),
        ratio_range=tuple(data.ratio_range),
        cat_max_ratio=data.cat_max_ratio,
        hflip=data.hflip,
        photometric=data.photometric,
        value_range=value_range,
    )
    val_tf = EvalTransform(scale=_pair_or_none(data.test_scale), value_range=value_range)
    train = build_segmentation_dataset(data.name, data.train_split, data.root, **options)
    val = build_segmentation_dataset(data.name, data.val_split, data.root, transform=val_tf, **options)
    classes = list(train.classes)
    if data.train_examples:
        train = train.take(data.train_examples)
    if data.val_examples:
        val = val.take(data.val_examples)
    return train, JointTransform(train_tf), val, classes


def _inference_settings(settings: dict | None) -> InferenceSettings:
    """Settings from a config or a checkpoint, where JSON gives lists back for the tuples."""
    return InferenceSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in (settings or {}).items()})


def build_model(model_cfg, classes: Sequence[str]) -> Segmenter:
    """A FlexiViT backbone (``model_cfg.init`` loads weights: a release, a file or a workdir) + a linear decoder.

    The backbone's classification head, if the checkpoint has one, is dropped.
    """
    overrides = {**(model_cfg.overrides or {}), "num_classes": 0}
    init = resolve_checkpoint(model_cfg.init) if model_cfg.init else None
    backbone = flexivit.create_model(model_cfg.name, pretrained=init, **overrides)
    return Segmenter(
        backbone=backbone,
        num_classes=len(classes),
        dropout=model_cfg.decoder_dropout,
        inference=_inference_settings(model_cfg.inference),
    )


def load_model(path: str | Path) -> Segmenter:
    """Rebuild a :class:`Segmenter` from a checkpoint the engine wrote (a file or a workdir), from the file alone."""
    path = resolve_checkpoint(path)
    state, meta = flexivit.read_checkpoint(path)
    kwargs = meta.get("model_kwargs") or {}
    if "backbone" not in kwargs:
        raise flexivit.CheckpointError(
            f"{path} is not a segmentation checkpoint (its model_kwargs have no 'backbone'); "
            "load a plain FlexiViT with flexivit.load_model"
        )
    model = Segmenter(
        backbone=flexivit.FlexiViT(**kwargs["backbone"]),
        num_classes=kwargs["num_classes"],
        dropout=kwargs.get("dropout", 0.0),
        inference=_inference_settings(kwargs.get("inference")),
    )
    return load_weights(model, state, path)


def make_loss(config, info: list[str], teacher=None):
    """``loss(net, batch, patch_size, step) -> (loss, terms)``: per-pixel cross-entropy at ``patch_size``, ignoring
    255 (padding, unlabelled), in float32.

    With ``train.consistency.weight`` the prediction at a second size drawn from ``(seed + 1, step)`` is also pulled
    towards the detached prediction at the training size (docs/reference.md §12), per labelled pixel. The config is
    read here, once; distillation and mixup are refused by the engine (``TASK.engine_features``).
    """
    weight, sizes, seed = config.train.consistency.weight, config.train.consistency.sizes, config.seed

    def loss_fn(net, batch, patch_size, step: int) -> tuple[torch.Tensor, dict]:
        images, masks = batch
        logits = net(images, patch_size=patch_size).float()  # (B, K, H, W)
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        terms = {"ce": loss}
        if weight:
            terms["consistency"] = consistency_loss(
                lambda size: net(images, patch_size=size),
                logits,
                sizes,
                seed=seed,
                step=step,
                dim=1,
                valid=masks != IGNORE_INDEX,
            )
            loss = loss + weight * terms["consistency"]
        return loss, terms

    return loss_fn


def _as_list(batch: list) -> list:
    return batch


@torch.no_grad()
@flexivit.in_eval_mode
def confusion_matrices(
    model: Segmenter, val_set, patch_sizes: Sequence, device: torch.device, autocast_dtype=None, batch_size: int = 8
) -> torch.Tensor:
    """(P, K, K) confusion matrices, one per patch size, summed over ranks (each rank takes every world-th image).

    Images are predicted with ``model.inference`` and scored at their label's size; images of different sizes
    (ADE20k) are batched only with images of the same size.
    """
    world, rank = distributed.world_size(), distributed.rank()
    loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=batch_size, collate_fn=_as_list)
    k = model.num_classes
    confusion = torch.zeros(len(patch_sizes), k, k, dtype=torch.int64, device=device)
    for items in loader:
        groups: dict[tuple, list] = {}
        for image, mask in items:
            groups.setdefault((tuple(image.shape), tuple(mask.shape)), []).append((image, mask))
        for group in groups.values():
            images = torch.stack([image for image, _ in group]).to(device)
            masks = torch.stack([mask for _, mask in group]).to(device)
            for i, patch in enumerate(patch_sizes):
                with autocast(device, autocast_dtype):
                    scores = predict_scores(model, images, patch, model.inference, out_size=masks.shape[-2:])
                confusion[i] += confusion_matrix(scores.argmax(1), masks, k, IGNORE_INDEX)
    return distributed.all_reduce_sum(confusion).cpu()


def evaluate(
    model: Segmenter, val_set, patch_sizes: Sequence, device: torch.device, autocast_dtype=None, batch_size: int = 8
) -> dict:
    """``{patch size: {"mIoU", "aAcc", "mAcc", "n"}}`` (fractions); per-class IoU: :func:`confusion_matrices`."""
    confusion = confusion_matrices(model, val_set, patch_sizes, device, autocast_dtype, batch_size)
    results = {}
    for patch, matrix in zip(patch_sizes, confusion, strict=True):
        metrics = segmentation_metrics(matrix)
        results[patch] = {key: metrics[key] for key in ("mIoU", "aAcc", "mAcc")} | {"n": len(val_set)}
    return results


def token_grid(image_hw, patch) -> tuple[int, int]:
    """The token grid at ``patch``: Segmenter pads the image to a multiple of the patch size (tools.eval reads this)."""
    return (math.ceil(image_hw[0] / patch[0]), math.ceil(image_hw[1] / patch[1]))


def image_forward(model: Segmenter):
    """What the tools count, time and export: the whole-image forward (padding, backbone, decoder, upsampling)."""
    return model


# ---------------------------------------------------------------------------------------------- user images


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, distinct and the same on every run (a golden-ratio walk around the hue circle)."""
    colours = [
        colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65 if i % 2 else 0.9, 0.95 if i % 3 else 0.75) for i in range(n)
    ]
    return (np.array(colours).reshape(n, 3) * 255).round().astype(np.uint8)


def legend_image(names: Sequence[str], colours: np.ndarray, row: int = 20) -> Image.Image:
    """One row per class: a colour swatch and the class name, black on white."""
    font = ImageFont.load_default()
    text_width = max((math.ceil(font.getlength(name)) for name in names), default=0)
    legend = Image.new("RGB", (row + 12 + text_width, row * max(len(names), 1)), "white")
    draw = ImageDraw.Draw(legend)
    for i, (name, colour) in enumerate(zip(names, colours, strict=True)):
        top = i * row
        draw.rectangle((2, top + 2, row - 2, top + row - 2), fill=tuple(int(c) for c in colour))
        draw.text((row + 6, top + row // 2), name, fill="black", font=font, anchor="lm")
    return legend


def predict(model: Segmenter, config, info: list[str], images, patch_size, options: dict) -> list[Prediction]:
    """Per image: a colour mask at the image's size (one colour per class, :func:`palette`), its legend (the classes
    present, largest first) and the fraction of pixels of each class present. Preprocessed and inferred as the
    validation images (``data.test_scale``, ``model.inference``)."""
    transform = EvalTransform(scale=_pair_or_none(config.data.test_scale), value_range=config.data.value_range)
    device = next(model.parameters()).device
    colours = palette(len(info))
    predictions = []
    for image in images:  # one at a time: user images differ in size
        x = transform.image(image)[None].to(device)
        with torch.no_grad():
            scores = predict_scores(model, x, patch_size, model.inference, out_size=(image.height, image.width))
        labels = scores.argmax(1)[0].cpu().numpy()  # (H, W)
        present, counts = np.unique(labels, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        present, fractions = present[order], counts[order] / labels.size
        shares = {info[c]: float(f) for c, f in zip(present, fractions, strict=True)}
        predictions.append(
            Prediction(
                summary=", ".join(f"{name} {share:.0%}" for name, share in shares.items()),
                record={"classes": shares},
                image=Image.fromarray(colours[labels]),
                overlay=True,
                legend=legend_image([info[c] for c in present], colours[present]),
            )
        )
    return predictions


TASK = Task(
    name="segmentation",
    build_datasets=build_datasets,
    build_model=build_model,
    make_loss=make_loss,
    evaluate=evaluate,
    load_model=load_model,
    predict=predict,
    image_forward=image_forward,
    token_grid=token_grid,
    engine_features=frozenset({"consistency"}),
    runlocal="configs/segmentation/scenes.py:runlocal",
)
