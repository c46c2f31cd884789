"""Image-text contrastive training on a FlexiViT image tower: LiT, FlexiLiT, CLIP / FlexiCLIP (paper Sec. 4, 5.2).

The task's face (tasks/__init__.py, :data:`TASK`): ``build_datasets``, ``build_model``, ``make_loss``, ``evaluate``,
``load_model``, ``predict`` (the texts that best match a user's images) and ``image_forward`` (the normalised image
embedding).

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
from pathlib import Path

import numpy as np
import torch

import flexivit
from tasks import Prediction, Task, ranked_predictions
from tasks.common.datasets import build_dataset, require_examples, take
from tasks.common.distributed import unwrap
from tasks.common.train_state import load_weights, resolve_checkpoint
from tasks.common.transforms import as_value_range, data_eval_transform, eval_transform, train_transform

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


def make_loss(config, info: dict, teacher=None):
    """``loss(net, batch, patch_size, step) -> (loss, terms)``: the contrastive loss ``model.loss`` of one
    (micro-)batch of (image, caption) pairs, images at ``patch_size``.

    The patch size is the engine's: fixed for LiT / CLIP, drawn per step from ``(seed, step)`` for FlexiLiT /
    FlexiCLIP, the same on every rank. Negatives are the other pairs of the (global) batch. No engine feature
    (consistency, distillation, mixup) applies: the engine refuses them (``TASK.engine_features``).
    """
    kind = config.model.loss

    def loss_fn(net, batch, patch_size, step: int) -> tuple[torch.Tensor, dict]:
        images, captions = batch
        tokens = unwrap(net).tokenize(decode_captions(captions), images.device)  # marked dynamic on the device
        out = net(images, tokens, patch_size=patch_size)  # through the DDP wrapper, so that gradients are synchronised
        loss = contrastive_loss(kind, **out)
        return loss, {kind: loss, "logit_scale": out["logit_scale"].detach()}

    return loss_fn


@torch.no_grad()
@flexivit.in_eval_mode
def evaluate(
    model, val_set: EvalData, patch_sizes: Sequence, device: torch.device, autocast_dtype=None, batch_size: int = 256
) -> dict:
    """``{patch: metrics}``: zero-shot ``top1`` / ``top5`` and retrieval ``i2t_r{1,5,10}`` / ``t2i_r{1,5,10}``."""
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
    return results


def image_forward(model: ImageTextModel):
    """The image tower with its projection and L2 normalisation, as ``fn(images, patch_size=p)``: what the tools
    count, time and export (the embedding that is compared with the text embeddings)."""
    return lambda images, patch_size=None: model.encode_image(images, patch_size, normalize=True)


def load_model(path: str | Path) -> ImageTextModel:
    """The two-tower model of a checkpoint the engine wrote (a file, or a workdir: its last one), from the file
    alone: both towers rebuilt from its ``model_kwargs`` (the text tower by its ``kind``), with its weights."""
    path = resolve_checkpoint(path)
    state, meta = flexivit.read_checkpoint(path)
    kwargs = meta.get("model_kwargs") or {}
    if "image" not in kwargs or "text" not in kwargs:
        raise flexivit.CheckpointError(
            f"{path} is not a contrastive checkpoint (its model_kwargs {sorted(kwargs)} have no 'image' and 'text')"
        )
    model = ImageTextModel.from_kwargs(kwargs)
    return load_weights(model, state, path)


def class_prompts(config, info: dict) -> list[str]:
    """The zero-shot class prompts: the first of ``data.zeroshot.templates`` filled with each class name."""
    templates = list((config.data.zeroshot or {}).get("templates") or ["{}"])
    return [templates[0].format(name) for name in (info or {}).get("classnames", [])]


def predict(model: ImageTextModel, config, info: dict, images, patch_size, options: dict) -> list[Prediction]:
    """The ``topk`` (default 3) ``queries`` nearest to each image by cosine similarity of the embeddings (default
    queries: the zero-shot class prompts, :func:`class_prompts`)."""
    queries = options.get("queries") or class_prompts(config, info)
    queries = [queries] if isinstance(queries, str) else list(queries)
    if not queries:
        raise ValueError(
            "the contrastive model needs texts to match: give --queries (its config has no zero-shot class names)"
        )
    transform = data_eval_transform(config.data)
    device = next(model.parameters()).device
    x = torch.stack([transform(image) for image in images]).to(device)  # (B, C, S, S)
    with torch.no_grad():
        texts = model.encode_text(model.tokenize(queries).to(device), normalize=True).float()  # (Q, D)
        similarity = model.encode_image(x, patch_size, normalize=True).float() @ texts.T  # (B, Q)
    # Queries quoted in the summary: one may hold commas.
    k = options.get("topk", 3)
    return ranked_predictions(similarity, queries, k, name="query", score="similarity", fmt=".3f", show=repr)


TASK = Task(
    name="contrastive",
    build_datasets=build_datasets,
    build_model=build_model,
    make_loss=make_loss,
    evaluate=evaluate,
    load_model=load_model,
    predict=predict,
    predict_options=("queries", "topk"),
    image_forward=image_forward,
    runlocal="configs/contrastive/fashion_mnist.py:runlocal",
)
