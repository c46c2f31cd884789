"""The panoptic task's data face for the engine (shared by both UViM stages): transforms, datasets, PQ evaluation.

Training items are ``(image, semantic, instance)`` at the square model size: flip and a random crop (UViM's
inception crop), the image resized bilinearly and the labels by nearest neighbour, the instance ids made canonical
*after* the augmentation (docs/reference.md §10). Evaluation predicts at the model size, resizes the maps back to
each image's own size by nearest neighbour, writes COCO panoptic files and scores them with ``pq_compute``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

import flexivit
from tasks.common import distributed
from tasks.common.loader import JointTransform
from tasks.common.transforms import as_value_range, normalize

from .evaluation import panoptic_metrics, pq_compute
from .targets import (
    PanopticDataError,
    PanopticDataset,
    canonical_instances,
    encode_prediction,
    read_coco_panoptic,
    write_encoded_panoptic,
)


def _to_model_input(image: torch.Tensor, value_range) -> torch.Tensor:
    return normalize(value_range)(image.float() / 255)


def eval_image(image, size: int, value_range) -> torch.Tensor:
    """A PIL RGB image as evaluation (and prediction) feeds it: resized to ``size`` x ``size`` (antialiased), in
    ``value_range``; (3, size, size) float32."""
    image = v2.functional.resize(v2.functional.pil_to_tensor(image), [size, size], antialias=True)
    return _to_model_input(image, value_range)


def resize_maps(semantic: torch.Tensor, instance: torch.Tensor, size_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's predicted ``(semantic, instance)`` maps (S, S) at the model size -> at ``size_hw`` (nearest),
    on the CPU: the maps PQ scores and prediction shows."""
    maps = torch.stack([semantic, instance])[None].float()
    maps = F.interpolate(maps, size=tuple(size_hw), mode="nearest")[0].long().cpu()
    return maps[0], maps[1]


class TrainTransform:
    """(PIL image, semantic, instance) -> (image (3, S, S) in ``value_range``, semantic (S, S), instance (S, S))."""

    def __init__(self, size: int, crop_area, hflip: bool, value_range, max_instances: int):
        ops = [v2.RandomResizedCrop(size, scale=tuple(crop_area), ratio=(3 / 4, 4 / 3), antialias=True)]
        self.ops = v2.Compose([*ops, *([v2.RandomHorizontalFlip()] if hflip else [])])
        self.value_range, self.max_instances = value_range, max_instances

    def __call__(self, image, semantic, instance):
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image))
        image, semantic, instance = self.ops(image, tv_tensors.Mask(semantic), tv_tensors.Mask(instance))
        instance = canonical_instances(instance.as_subclass(torch.Tensor), self.max_instances - 1)
        return (
            _to_model_input(image.as_subclass(torch.Tensor), self.value_range),
            semantic.as_subclass(torch.Tensor),
            instance,
        )


class EvalTransform:
    """The whole image and its labels resized to the square model size (labels nearest, instances canonical)."""

    def __init__(self, size: int, value_range, max_instances: int):
        self.size, self.value_range, self.max_instances = size, value_range, max_instances

    def __call__(self, image, semantic, instance):
        labels = torch.stack([semantic, instance])[None].float()
        semantic, instance = F.interpolate(labels, size=(self.size, self.size), mode="nearest")[0].long()
        image = eval_image(image, self.size, self.value_range)
        return image, semantic, canonical_instances(instance, self.max_instances - 1)


@dataclass
class EvalSet:
    """What :func:`evaluate_pq` needs: the images (with the eval transform) and the ground-truth files."""

    images: PanopticDataset
    gt_json: Path
    gt_dir: Path

    def __len__(self) -> int:
        return len(self.images)


def _split(data, split: str) -> tuple[PanopticDataset, Path]:
    """The split's dataset and its PNG folder (the ground truth pq_compute reads)."""
    root = Path(data.root)
    folder = data.train_split if split == "train" else data.val_split
    name = "train" if split == "train" else "val"
    png_dir = root / "panoptic" / f"panoptic_{name}"
    return read_coco_panoptic(png_dir.with_suffix(".json"), png_dir, root / "images" / folder), png_dir


def build_datasets(data, distill=None) -> tuple:
    """``(train set, joint train transform, EvalSet, info)`` from a COCO panoptic layout at ``data.root``
    (``panoptic/panoptic_{train,val}.json`` + PNG folders, ``images/<split>``); generated scenes are written there
    first when ``data.generate`` is set and the folder is missing. ``info`` sizes the models and labels predictions:
    ``categories[k - 1]`` is class k's ``{"id", "name", "isthing", "color"}`` (``color`` [r, g, b] or None).
    ``distill`` is never set: the task contract refuses it (``engine_features``)."""
    from tasks.common.scenes import ensure_generated

    ensure_generated("ade20k", data.root, data.generate)  # the scenes are written in every format at once
    value_range = as_value_range(data.value_range)
    (train, _), (val, val_png_dir) = _split(data, "train"), _split(data, "val")
    if train.category_ids != val.category_ids:
        raise ValueError(f"{train.json_path} and {val.json_path} have different categories")
    for split in (train, val):
        if not len(split):
            raise PanopticDataError(f"{split.json_path}: no annotated images")
    if data.train_examples:
        train.records = train.records[: data.train_examples]
    if data.val_examples:  # PQ is then scored against the ground truth of these images alone (evaluate_pq)
        val.records = val.records[: data.val_examples]
    train_tf = TrainTransform(data.image_size, data.crop_area, data.hflip, value_range, data.max_instances)
    val.transform = EvalTransform(data.image_size, value_range, data.max_instances)
    info = {
        "num_classes": len(train.classes) + 1,  # + void
        "image_size": data.image_size,
        "max_instances": data.max_instances,
        "categories": train.categories(),
    }
    return train, JointTransform(train_tf), EvalSet(val, val.json_path, val_png_dir), info


@torch.no_grad()
def evaluate_pq(predict, val_set: EvalSet, patch_sizes, device, batch_size: int = 8, results_dir=None) -> dict:
    """``{patch: PQ metrics (percent)}``: ``predict(images, semantic, instance, patch) -> (semantic, instance)``
    maps at the model size for each batch; they are resized to each image's size, written and scored by
    ``pq_compute`` against the ground truth of the set's images (all of the JSON's, or the ``val_examples`` first).
    Under DDP each process predicts every world-size-th image and sends its encoded PNGs to the main process, which
    scores the whole set; every process gets the same numbers, or the main process's error."""
    dataset = val_set.images
    if not len(dataset):
        raise ValueError(f"{val_set.gt_json}: no annotated images to evaluate")
    mine = list(range(distributed.rank(), len(dataset), distributed.world_size()))
    results = {}
    with tempfile.TemporaryDirectory(prefix="flexivit-panoptic-") as tmp:
        for patch in patch_sizes:
            encoded = []
            for start in range(0, len(mine), batch_size):
                indices = mine[start : start + batch_size]
                items = [dataset[k] for k in indices]
                images, semantic, instance = (torch.stack(parts).to(device) for parts in zip(*items, strict=True))
                got_semantic, got_instance = predict(images, semantic, instance, patch)
                for k, index in enumerate(indices):
                    record = dataset.records[index]
                    maps = resize_maps(got_semantic[k], got_instance[k], (record.height, record.width))
                    prediction = (record.image_id, record.image.name, maps[0].numpy(), maps[1].numpy())
                    encoded.append((index, *encode_prediction(*prediction, dataset.category_ids)))
            parts = distributed.gather_object(encoded)  # the main process alone holds every image's PNG
            out = Path(results_dir or tmp) / f"p{flexivit.patch_sizes.patch_size_name(patch)}"
            results[patch] = distributed.on_main(_score, parts, val_set, out)
    return results


def _score(parts: list, val_set: EvalSet, out: Path) -> dict:
    """The main process's half of :func:`evaluate_pq`: write the gathered predictions in the images' order and
    score them against the ground truth of these images alone (``data.val_examples`` may have kept a subset)."""
    gathered = sorted((item for part in parts for item in part), key=lambda item: item[0])
    encoded = [(annotation, png) for _, annotation, png in gathered]
    out_json = write_encoded_panoptic(encoded, out.with_suffix(".json"), out, val_set.gt_json)
    image_ids = [record.image_id for record in val_set.images.records]
    return panoptic_metrics(pq_compute(val_set.gt_json, out_json, val_set.gt_dir, out, image_ids=image_ids))
