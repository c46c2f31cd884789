"""Inference at any patch size: whole image or sliding window, optional flip and multi-scale (mmseg's test modes).

``forward(images, patch_size=p) -> logits (B, K, h, w)`` is any model that keeps the input size (a
:class:`~tasks.segmentation.model.Segmenter`); these functions only tile, resize and average its outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Forward = Callable[..., torch.Tensor]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class InferenceSettings:
    """How a validation image is predicted.

    mode: ``"whole"`` (one forward pass on the whole image) or ``"slide"`` (windows of ``crop`` every ``stride``
        pixels, logits averaged where they overlap; Segmenter / mmseg ``mode="slide"``).
    flip: also predict the mirrored image and average the probabilities.
    scales: resize factors of the image; the probabilities of all scales (and flips) are averaged.
    """

    mode: str = "whole"
    crop: int | Sequence[int] = 512
    stride: int | Sequence[int] = 512
    flip: bool = False
    scales: Sequence[float] = (1.0,)

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"inference mode must be 'whole' or 'slide', got {self.mode!r}")
        if min(_pair(self.stride)) < 1 or min(_pair(self.crop)) < 1:
            raise ValueError(f"crop {self.crop} and stride {self.stride} must be positive")


def window_boxes(image_hw: Sequence[int], crop, stride) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` of the sliding windows, laid out as mmseg's ``slide_inference``.

    Windows start every ``stride`` pixels; the last one in each direction is shifted back to end at the border,
    and a window never exceeds the image (an image smaller than ``crop`` is one window, the whole image).
    """
    (h, w), (ch, cw), (sh, sw) = image_hw, _pair(crop), _pair(stride)
    rows, cols = max(h - ch + sh - 1, 0) // sh + 1, max(w - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def slide_logits(forward: Forward, images: torch.Tensor, patch_size, crop, stride) -> torch.Tensor:
    """Logits (B, K, H, W) averaged over sliding windows; each window is run at ``patch_size``."""
    total, count = None, images.new_zeros(1, 1, *images.shape[-2:])
    for y1, y2, x1, x2 in window_boxes(images.shape[-2:], crop, stride):
        logits = forward(images[..., y1:y2, x1:x2], patch_size=patch_size).float()
        if total is None:
            total = logits.new_zeros(*logits.shape[:2], *images.shape[-2:])
        total[..., y1:y2, x1:x2] += logits
        count[..., y1:y2, x1:x2] += 1
    return total / count


def predict(
    forward: Forward,
    images: torch.Tensor,
    patch_size,
    settings: InferenceSettings = InferenceSettings(),
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class scores (B, K, *out_size) whose argmax is the prediction.

    Single scale without flip: the logits, bilinearly resized to ``out_size`` (the label's size; mmseg resizes the
    logits, not the predicted labels). With flip or several scales: the average of the softmax probabilities.
    """
    out_size = tuple(out_size or images.shape[-2:])
    views = [(s, flip) for s in settings.scales for flip in ((False, True) if settings.flip else (False,))]
    scores = None
    for scale, flip in views:
        x = images.flip(-1) if flip else images
        if scale != 1.0:
            size = [max(1, round(d * scale)) for d in images.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if settings.mode == "slide":
            logits = slide_logits(forward, x, patch_size, settings.crop, settings.stride)
        else:
            logits = forward(x, patch_size=patch_size).float()
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        if flip:
            logits = logits.flip(-1)
        if len(views) == 1:
            return logits
        probs = logits.softmax(1)
        scores = probs if scores is None else scores + probs
    return scores / len(views)
