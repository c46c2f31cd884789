"""Image-text contrastive training on a FlexiViT image tower: LiT, FlexiLiT, CLIP / FlexiCLIP (paper Sec. 4, 5.2).

The task's face for the engine: ``build_datasets``, ``build_model``, ``train_loss``, ``evaluate``, ``image_forward``.

- LiT: ``model.lock_image=True`` and a fixed patch size: the text tower learns to match the locked image
  embeddings at that one sequence length.
- FlexiLiT: the same locked tower, queried at a random patch size every step (``patch_sizes.kind="uniform"``), so
  the text tower matches its embeddings at every sequence length (Fig. 10).
- CLIP / FlexiCLIP: ``model.lock_image=False``; both towers train, at a fixed or a random patch size.

Losses (``model.loss``): ``softmax`` (CLIP) or ``sigmoid`` (SigLIP, with a learnable bias). Evaluation: zero-shot
classification on any classification dataset of the engine (``data.zeroshot``) and image<->text retrieval R@1/5/10
on the validation captions, at every patch size of ``eval.patch_sizes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

import flexivit
from tasks.common.datasets import build_dataset, require_examples, take
from tasks.common.distributed import unwrap
from tasks.common.train_state import resolve_checkpoint
from tasks.common.transforms import as_value_range, eval_transform, train_transform

from .data import CaptionPairs, ImageTextSet, decode_captions, read_karpathy, read_pairs_file, read_tar_shards
from .evaluators import (
    EvalData,
    caption_relevance,
    encode_images,
    encode_texts,
    retrieval_metrics,
    zeroshot_classifier,
    zeroshot_metrics,
)
from .fashion_captions import fashion_captions
from .losses import contrastive_loss
from .model import ImageTextModel, build_text_tower


def _fashion(data, split) -> ImageTextSet:
    return fashion_captions(split, root=data.root, captions_per_image=data.captions_per_image, seed=0)


# data.name -> reader(data config, split) -> ImageTextSet. What a "split" is depends on the source.
READERS = {
    "fashion_mnist_captions": _fashion,  # "train" / "test" (the embedded default)
    "flickr30k": lambda data, split: read_karpathy(data.path, data.root, split),  # Karpathy split names
    "coco": lambda data, split: read_karpathy(data.path, data.root, split),  # e.g. ["train", "restval"] / "test"
    "pairs": lambda data, split: read_pairs_file(split, data.root),  # a CSV / JSON-lines file per split
    "shards": lambda data, split: read_tar_shards(split),  # a glob of tar shards per split
}


def read_image_text(data, split) -> ImageTextSet:
    """The image-text set ``data.name`` (one of :data:`READERS`) at ``split``."""
    if data.name not in READERS:
        raise KeyError(f"unknown image-text dataset {data.name!r}; valid names: {', '.join(READERS)}")
    return READERS[data.name](data, split)


def _sample(dataset: ImageTextSet, n: int | None, seed: int = 0) -> ImageTextSet:
    if not n or n >= len(dataset):
        return dataset
    return dataset.subset(np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)))


def build_datasets(data, distill=None) -> tuple:
    """``(train pairs, train transform, EvalData, {"classnames": zero-shot class names})``.

    Training items are ``(image, encoded caption)``, one per (image, caption) pair; ``data.train_examples`` and
    ``data.val_examples`` keep a fixed random subset of images (with all their captions).
    """
    if distill:
        raise ValueError("the contrastive task has no distillation: set distill=None")
    value_range = as_value_range(data.value_range)
    train_tf = train_transform(
        data.image_size, crop_scale=tuple(data.crop_scale), hflip=data.hflip, value_range=value_range
    )
    val_tf = eval_transform(data.image_size, crop_ratio=data.eval_crop_ratio, value_range=value_range)
    train = _sample(read_image_text(data, data.train_split), data.train_examples)
    require_examples(train, f"data.train_split={data.train_split!r} of {data.name}")
    retrieval = None
    if data.val_split:
        retrieval = _sample(read_image_text(data, data.val_split), data.val_examples).with_transform(val_tf)
        require_examples(retrieval, f"data.val_split={data.val_split!r} of {data.name}")
    zeroshot, classnames, templates = None, [], []
    if data.zeroshot:
        spec = data.zeroshot
        zeroshot = build_dataset(spec.name, spec.split, root=spec.root, transform=val_tf)
        if spec.examples and spec.examples < len(zeroshot):
            zeroshot = take(zeroshot, spec.examples, seed=0)
        require_examples(zeroshot, f"data.zeroshot split {spec.split!r} of {spec.name}")
        classnames, templates = list(zeroshot.classes), list(spec.templates)
    val = EvalData(zeroshot=zeroshot, classnames=classnames, templates=templates, retrieval=retrieval)
    return CaptionPairs(train, data.caption_bytes), train_tf, val, {"classnames": classnames}


def build_model(model_cfg, info=None) -> ImageTextModel:
    """The image tower (``model.name`` with ``model.overrides``, weights from ``model.init``: a .npz / timm / our
    checkpoint or a training workdir, its head dropped) and the text tower ``model.text`` (``kind`` + arguments)."""
    init = resolve_checkpoint(model_cfg.init) if model_cfg.init else None
    image = flexivit.create_model(model_cfg.name, pretrained=init, **{**(model_cfg.overrides or {}), "num_classes": 0})
    text = build_text_tower(**model_cfg.text)
    if model_cfg.loss not in ("softmax", "sigmoid"):
        raise ValueError(f"model.loss must be 'softmax' or 'sigmoid', got {model_cfg.loss!r}")
    return ImageTextModel(
        image=image,
        text=text,
        embed_dim=model_cfg.embed_dim,
        image_proj=model_cfg.image_proj,
        text_proj=model_cfg.text_proj,
        lock_image=model_cfg.lock_image,
        temperature_init=model_cfg.temperature_init,
        bias_init=model_cfg.bias_init if model_cfg.loss == "sigmoid" else None,
    )


def train_loss(net, batch, patch_size, *, step: int, config, teacher=None) -> tuple[torch.Tensor, dict]:
    """``(loss, terms)``: the contrastive loss of one (micro-)batch of (image, caption) pairs, images at ``patch_size``.

    The patch size is the engine's: fixed for LiT / CLIP, drawn per step from ``(seed, step)`` for FlexiLiT /
    FlexiCLIP, the same on every rank. Negatives are the other pairs of the (global) batch.
    """
    if teacher is not None:
        raise ValueError("the contrastive task has no distillation: set distill=None")
    images, captions = batch
    tokens = unwrap(net).tokenize(decode_captions(captions)).to(images.device, non_blocking=True)
    out = net(images, tokens, patch_size=patch_size)  # through the DDP wrapper, so that gradients are synchronised
    loss = contrastive_loss(config.model.loss, **out)
    return loss, {config.model.loss: loss, "logit_scale": out["logit_scale"].detach()}


@torch.no_grad()
def evaluate(
    model, val_set: EvalData, patch_sizes: Sequence, device: torch.device, autocast_dtype=None, batch_size: int = 256
) -> dict:
    """``{patch: metrics}``: zero-shot ``top1`` / ``top5`` and retrieval ``i2t_r{1,5,10}`` / ``t2i_r{1,5,10}``."""
    was_training = model.training
    model.eval()
    results = {patch: {} for patch in patch_sizes}
    if val_set.zeroshot is not None:
        classifier = zeroshot_classifier(model, val_set.classnames, val_set.templates, device).cpu()
        features, labels = encode_images(model, val_set.zeroshot, patch_sizes, device, autocast_dtype, batch_size)
        for patch in patch_sizes:
            results[patch].update(zeroshot_metrics(features[patch], classifier, labels))
    if val_set.retrieval is not None:
        texts, relevant = caption_relevance(val_set.retrieval.captions)
        text_features = encode_texts(model, texts, device, autocast_dtype, batch_size)
        features, index = encode_images(model, val_set.retrieval, patch_sizes, device, autocast_dtype, batch_size)
        for patch in patch_sizes:
            results[patch].update(retrieval_metrics(features[patch], text_features, relevant[index]))
    model.train(was_training)
    return results


def image_forward(model: ImageTextModel):
    """The image tower with its projection, as ``fn(images, patch_size=p)``: what ``tools.eval`` counts and times."""
    return lambda images, patch_size=None: model.encode_image(images, patch_size=patch_size)
