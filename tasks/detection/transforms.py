"""OWL-ViT's detection transforms with torchvision v2 on tv_tensors, and the batch collation.

Training (docs/reference.md §8): random crop (area 0.3-1, aspect 0.75-1.33) dropping boxes that keep < 60 % of their
area -> horizontal flip -> resize the long side to S keeping the aspect -> pad bottom/right to S x S with 0.5;
mosaics of 1x1 / 2x2 / 3x3 such images (p = 0.4 / 0.3 / 0.3); then the image's federated query set. Evaluation:
resize the long side to S, pad bottom/right with 0. Pad values are pixel intensities in [0, 1] (0.5 = mid-grey),
mapped to the model's value range with the image. All randomness comes from torch's global generator, which
tasks/common/loader.py seeds per item.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tasks.common.transforms import ValueRange, normalize

from .data import DetectionDataset
from .queries import sample_queries

Window = tuple[int, int, int, int]  # top, left, height, width


def _area(xyxy: torch.Tensor) -> torch.Tensor:
    return (xyxy[:, 2] - xyxy[:, 0]).clamp(min=0) * (xyxy[:, 3] - xyxy[:, 1]).clamp(min=0)


def crop(
    image: torch.Tensor, boxes: tv_tensors.BoundingBoxes, window: Window, min_box_fraction: float
) -> tuple[torch.Tensor, tv_tensors.BoundingBoxes, torch.Tensor, torch.Tensor]:
    """Crop ``window`` out of the image and its XYXY boxes: ``(image, kept boxes, keep (M,), fraction (M,))``.

    ``fraction`` is each box's area inside the window over its area before; boxes below ``min_box_fraction`` are
    dropped (v2.SanitizeBoundingBoxes only drops degenerate ones).
    """
    before = _area(boxes)
    image = TF.crop(image, *window)
    cropped = TF.clamp_bounding_boxes(TF.crop(boxes, *window))
    fraction = _area(cropped) / before.clamp(min=1e-12)
    keep = fraction >= min_box_fraction
    return image, tv_tensors.wrap(cropped[keep], like=cropped), keep, fraction


def resize_with_pad(
    image: torch.Tensor, boxes: tv_tensors.BoundingBoxes | None, size: int, pad_value: float
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Resize the long side to ``size`` keeping the aspect, pad bottom/right to ``size`` x ``size``.

    ``image`` uint8 (3, h, w) -> float (3, size, size) in [0, 1] with ``pad_value`` in the padding; ``boxes`` XYXY
    pixels -> XYXY pixels of the padded square. ``scale`` = size / max(h, w) (the rounded resize differs from it by
    under half a pixel).
    """
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    new_hw = [max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))]
    resized = TF.to_dtype(TF.resize(image, new_hw, antialias=True), torch.float32, scale=True)
    canvas = torch.full((3, size, size), float(pad_value))
    canvas[:, : new_hw[0], : new_hw[1]] = resized
    if boxes is not None:
        boxes = TF.resize(boxes, new_hw).as_subclass(torch.Tensor)
    return canvas, boxes, scale


def xyxy_to_cxcywh(xyxy: torch.Tensor) -> torch.Tensor:
    return torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)


def crop_flip_resize(
    image: torch.Tensor,
    boxes: tv_tensors.BoundingBoxes,
    size: int,
    *,
    window: Window | None = None,
    flip: bool = False,
    min_box_fraction: float = 0.6,
    pad_value: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deterministic part of the train transform on one image.

    Returns ``(canvas (3, size, size) float in [0, 1], kept boxes (K, 4) XYXY canvas pixels, keep (M,) bool,
    partial (M,) bool)``: ``partial`` marks dropped boxes still partly visible, whose classes must not be taught as
    absent from the image.
    """
    keep = torch.ones(len(boxes), dtype=torch.bool)
    partial = torch.zeros(len(boxes), dtype=torch.bool)
    if window is not None:
        image, boxes, keep, fraction = crop(image, boxes, window, min_box_fraction)
        partial = ~keep & (fraction > 0)
    if flip:
        image, boxes = TF.horizontal_flip(image), TF.horizontal_flip(boxes)
    canvas, xyxy, _ = resize_with_pad(image, boxes, size, pad_value)
    return canvas, xyxy, keep, partial


class TrainTransform:
    """``(image uint8 (3, H, W), target) -> (image (3, S, S) float, boxes (M, 4) cxcywh in [0, 1] of the square,
    labels (M, Q) float, queries (Q,) int64 (-1 padded), query_valid (Q,) bool)``.

    Wrap it in tasks.common.loader.JointTransform for SeededItems. ``mosaic_probs[k - 1]`` is the probability of a
    k x k mosaic; its k² - 1 extra cells are random items of ``dataset`` (raw, through ``dataset.load``), each
    cropped, flipped and resized with pad into an (S // k)-pixel cell. ``class_weights`` (C,) weight the random
    negatives (tasks.detection.queries.frequency_weights); ``excluded_classes`` (None: ``dataset.excluded``) never
    enter a query set. ``crop_area=None`` disables the crop.
    """

    def __init__(
        self,
        size: int,
        *,
        dataset: DetectionDataset | None = None,
        num_queries: int,
        class_weights,
        excluded_classes=None,
        hflip: bool = True,
        crop_area: tuple[float, float] | None = (0.3, 1.0),
        crop_aspect: tuple[float, float] = (0.75, 1.333),
        min_box_fraction: float = 0.6,
        pad_value: float = 0.5,
        mosaic_probs: Sequence[float] | None = (0.4, 0.3, 0.3),
        value_range: ValueRange = (-1.0, 1.0),
    ):
        if mosaic_probs is not None:
            probs = torch.as_tensor(mosaic_probs, dtype=torch.float64)
            if probs.ndim != 1 or (probs < 0).any() or abs(float(probs.sum()) - 1) > 1e-6:
                raise ValueError(f"mosaic_probs must be probabilities of 1x1, 2x2, ... summing to 1: {mosaic_probs}")
            if len(probs) > 1 and dataset is None:
                raise ValueError("mosaics need the dataset to draw their extra cells from (dataset=...)")
            if size < len(probs):
                raise ValueError(f"image size {size} is too small for {len(probs)}x{len(probs)} mosaics")
            mosaic_probs = probs
        if excluded_classes is None:
            excluded_classes = dataset.excluded if dataset is not None else ()
        self.size, self.dataset, self.num_queries = size, dataset, num_queries
        self.class_weights = torch.as_tensor(class_weights, dtype=torch.float64)
        self.excluded = torch.zeros(len(self.class_weights), dtype=torch.bool)
        self.excluded[sorted(excluded_classes)] = True
        self.hflip, self.crop_area, self.crop_aspect = hflip, crop_area, list(crop_aspect)
        self.min_box_fraction, self.pad_value, self.mosaic_probs = min_box_fraction, pad_value, mosaic_probs
        self.to_range = normalize(value_range)

    def _grid(self) -> int:
        if self.mosaic_probs is None or len(self.mosaic_probs) == 1:
            return 1
        return int(torch.multinomial(self.mosaic_probs, 1)) + 1

    def _cell(self, image: torch.Tensor, boxes: tv_tensors.BoundingBoxes, size: int):
        window = None
        if self.crop_area is not None:
            window = tuple(v2.RandomResizedCrop.get_params(image, list(self.crop_area), self.crop_aspect))
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        return crop_flip_resize(
            image,
            boxes,
            size,
            window=window,
            flip=flip,
            min_box_fraction=self.min_box_fraction,
            pad_value=self.pad_value,
        )

    def __call__(self, image: torch.Tensor, target: dict):
        s, k = self.size, self._grid()
        items = [(image, target)]
        if k > 1:
            items += [self.dataset.load(int(j)) for j in torch.randint(len(self.dataset), (k * k - 1,))]
        cell = s // k  # a strip of s - k * cell pixels right and below the grid stays padding
        canvas = torch.full((3, s, s), float(self.pad_value))
        boxes, labels = [], []
        c = len(self.class_weights)
        negatives, partly_visible = torch.zeros(c, dtype=torch.bool), torch.zeros(c, dtype=torch.bool)
        for n, (img, tgt) in enumerate(items):
            if tgt["labels"].shape[-1] != c:
                raise ValueError(f"image id {tgt['image_id']} has {tgt['labels'].shape[-1]} classes, weights {c}")
            row, col = divmod(n, k)
            cell_image, xyxy, keep, partial = self._cell(img, tgt["boxes"], cell)
            canvas[:, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = cell_image
            boxes.append(xyxy + torch.tensor([col, row, col, row], dtype=xyxy.dtype) * cell)
            labels.append(tgt["labels"][keep])
            partly_visible |= tgt["labels"][partial].any(0)
            negatives |= tgt["negatives"]
        boxes, labels = torch.cat(boxes), torch.cat(labels)  # (M, 4) XYXY canvas pixels, (M, C) bool
        positives = labels.any(0)
        # A mosaic's verified negatives are those of any cell not positive in another: the same kind of noise as the
        # random negatives, which are not verified either (OWL-ViT accepts it). Classes of boxes the crop dropped
        # while still partly visible are left out of the query set: teaching them as absent would be wrong.
        excluded = self.excluded | (partly_visible & ~positives)
        queries, valid = sample_queries(
            positives, negatives & ~positives, self.num_queries, self.class_weights, excluded
        )
        query_labels = (labels[:, queries.clamp(min=0)] & valid).float()  # (M, Q)
        return self.to_range(canvas), xyxy_to_cxcywh(boxes) / s, query_labels, queries, valid


class EvalTransform:
    """``(image uint8 (3, H, W), target) -> (image (3, S, S) float, {image_id, scale, orig_size})``: resize the long
    side to S, pad bottom/right with ``pad_value`` (in [0, 1] pixels); predictions map back to pixels as
    ``xyxy_normalised * S / scale``."""

    def __init__(self, size: int, value_range: ValueRange = (-1.0, 1.0), pad_value: float = 0.0):
        self.size, self.pad_value, self.to_range = size, pad_value, normalize(value_range)

    def __call__(self, image: torch.Tensor, target: dict):
        h, w = image.shape[-2:]
        canvas, _, scale = resize_with_pad(image, None, self.size, self.pad_value)
        return self.to_range(canvas), {"image_id": target["image_id"], "scale": scale, "orig_size": (int(h), int(w))}


def collate(items: Sequence[tuple]) -> tuple[torch.Tensor, ...]:
    """Training items -> ``(images (B,3,S,S), boxes (B,M,4), box_valid (B,M), labels (B,M,Q), queries (B,Q),
    query_valid (B,Q))`` with M = the most boxes of an item (at least 1); padding rows are zeros, box_valid False."""
    images, boxes, labels, queries, query_valid = zip(*items, strict=True)
    b, q = len(items), queries[0].shape[0]
    if any(x.shape != (q,) for x in queries):
        raise ValueError(f"items have different query counts: {[tuple(x.shape) for x in queries]}")
    m = max(1, max(len(x) for x in boxes))
    out_boxes, box_valid = torch.zeros(b, m, 4), torch.zeros(b, m, dtype=torch.bool)
    out_labels = torch.zeros(b, m, q)
    for i, (x, y) in enumerate(zip(boxes, labels, strict=True)):
        out_boxes[i, : len(x)], box_valid[i, : len(x)], out_labels[i, : len(y)] = x, True, y
    return torch.stack(images), out_boxes, box_valid, out_labels, torch.stack(queries), torch.stack(query_valid)


def collate_eval(items: Sequence[tuple]) -> tuple[torch.Tensor, list[dict]]:
    """Eval items -> ``(images (B, 3, S, S), [target, ...])``."""
    images, targets = zip(*items, strict=True)
    return torch.stack(images), list(targets)
