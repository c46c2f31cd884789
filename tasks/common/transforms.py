"""Image preprocessing for classification: PIL image (or uint8 tensor) in, float tensor (C, H, W) out."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ValueRange = tuple[float, float] | str


def _to_channels(channels: int) -> v2.Transform:
    """Gray -> 3 identical channels, or colour -> luminance, so every batch has the same channel count."""
    if channels == 3:
        return v2.RGB()
    if channels == 1:
        return v2.Grayscale(num_output_channels=1)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def _normalize(value_range: ValueRange, channels: int) -> list[v2.Transform]:
    """Map pixels, already scaled to [0, 1], to ``value_range``.

    ``(lo, hi)`` maps [0, 1] linearly onto [lo, hi]: (-1, 1) is mean = std = 0.5, the big_vision
    convention; (0, 1) leaves pixels as they are. "imagenet" standardises with the ImageNet statistics.
    """
    if value_range == "imagenet":
        if channels != 3:
            raise ValueError('value_range="imagenet" needs channels=3 (the statistics are per RGB channel)')
        return [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if isinstance(value_range, str):
        raise ValueError(f'value_range must be (lo, hi) or "imagenet", got {value_range!r}')
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range needs lo < hi, got {value_range}")
    if (lo, hi) == (0.0, 1.0):
        return []
    # (x - mean) / std = lo + x * (hi - lo)  =>  std = 1 / (hi - lo), mean = -lo / (hi - lo)
    return [v2.Normalize([-lo / (hi - lo)] * channels, [1.0 / (hi - lo)] * channels)]


def _to_float(value_range: ValueRange, channels: int) -> list[v2.Transform]:
    # ToPureTensor last: downstream code gets a plain torch.Tensor, not a tv_tensors.Image subclass.
    return [v2.ToDtype(torch.float32, scale=True), *_normalize(value_range, channels), v2.ToPureTensor()]


def train_transform(
    image_size: int,
    *,
    value_range: ValueRange = (-1.0, 1.0),
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    randaugment: bool | None = False,
    randaugment_magnitude: int = 9,
    channels: int = 3,
) -> v2.Compose:
    """Inception-style random crop to ``image_size`` (area fraction in ``crop_scale``), optional flip and
    RandAugment (2 ops at ``randaugment_magnitude``), then float (C, S, S) in ``value_range``.

    Use a gentler ``crop_scale`` such as (0.5, 1.0) for 28x28 datasets, where an 8% crop is a few pixels,
    and ``hflip=False`` where mirroring changes the class (digits).
    """
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment:
        steps.append(v2.RandAugment(num_ops=2, magnitude=randaugment_magnitude))
    # Channels last: on gray images every step before this one does a third of the work.
    return v2.Compose([*steps, _to_channels(channels), *_to_float(value_range, channels)])


def eval_transform(
    image_size: int,
    *,
    value_range: ValueRange = (-1.0, 1.0),
    crop_ratio: float = 0.875,
    channels: int = 3,
) -> v2.Compose:
    """Resize the short side to ``image_size / crop_ratio`` and centre-crop ``image_size``.

    ``crop_ratio=1.0`` is a straight resize to ``image_size`` x ``image_size`` (no crop, aspect ratio not
    kept), which suits tiny square datasets such as Fashion-MNIST where cropping would cut off content.
    """
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    if crop_ratio == 1.0:
        resize = [v2.Resize((image_size, image_size), antialias=True)]
    else:
        resize = [v2.Resize(round(image_size / crop_ratio), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *resize, _to_channels(channels), *_to_float(value_range, channels)])
