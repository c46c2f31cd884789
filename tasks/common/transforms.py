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


def normalize(value_range: ValueRange, channels: int = 3) -> v2.Transform:
    """Map pixels, already scaled to [0, 1], to ``value_range``: the one input normalisation of every task.

    ``(lo, hi)`` maps [0, 1] linearly onto [lo, hi]: (-1, 1) is mean = std = 0.5, the big_vision
    convention; (0, 1) leaves pixels as they are. "imagenet" standardises with the ImageNet statistics.
    """
    value_range = as_value_range(value_range)
    if value_range == "imagenet":
        if channels != 3:
            raise ValueError('value_range="imagenet" needs channels=3 (the statistics are per RGB channel)')
        return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if isinstance(value_range, str):
        raise ValueError(f'value_range must be (lo, hi) or "imagenet", got {value_range!r}')
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range needs lo < hi, got {value_range}")
    if (lo, hi) == (0.0, 1.0):
        return v2.Identity()
    # (x - mean) / std = lo + x * (hi - lo)  =>  std = 1 / (hi - lo), mean = -lo / (hi - lo)
    return v2.Normalize([-lo / (hi - lo)] * channels, [1.0 / (hi - lo)] * channels)


def _to_float(value_range: ValueRange, channels: int) -> list[v2.Transform]:
    # ToPureTensor last: downstream code gets a plain torch.Tensor, not a tv_tensors.Image subclass.
    return [v2.ToDtype(torch.float32, scale=True), normalize(value_range, channels), v2.ToPureTensor()]


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


def data_eval_transform(data, crop_ratio: float | None = None) -> v2.Compose:
    """:func:`eval_transform` as a data config sets it (``image_size``, ``value_range``, ``eval_crop_ratio`` unless
    ``crop_ratio`` is given): how tools.predict, tools.analyze and tools.demo preprocess a user's own image files."""
    ratio = data.eval_crop_ratio if crop_ratio is None else crop_ratio
    return eval_transform(data.image_size, crop_ratio=ratio, value_range=as_value_range(data.value_range))


class ConsistentViews:
    """One random crop (and flip) of an image, resized to each of ``sizes``: FunMatch's consistent views.

    A teacher that runs at another resolution than its student (a DeiT-III teacher at 384 px for a 240 px student)
    gets its own resize of the very crop the student sees, instead of the student's image upsampled. Returns one
    float (C, S, S) tensor per size, each in ``value_range``.
    """

    def __init__(
        self,
        sizes: tuple[int, ...],
        *,
        value_range: ValueRange = (-1.0, 1.0),
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        channels: int = 3,
    ):
        self.sizes, self.crop_scale, self.hflip = tuple(sizes), list(crop_scale), hflip
        self.finish = v2.Compose([_to_channels(channels), *_to_float(value_range, channels)])

    def __call__(self, image) -> tuple[torch.Tensor, ...]:
        image = v2.functional.to_image(image)
        # The parameters of v2.RandomResizedCrop, drawn once for all views (the default aspect-ratio range).
        top, left, h, w = v2.RandomResizedCrop.get_params(image, self.crop_scale, [3 / 4, 4 / 3])
        flip = self.hflip and torch.rand(1).item() < 0.5
        views = []
        for size in self.sizes:
            view = v2.functional.resized_crop(image, top, left, h, w, [size, size], antialias=True)
            views.append(self.finish(v2.functional.horizontal_flip(view) if flip else view))
        return tuple(views)


def value_range_affine(source: ValueRange, target: ValueRange, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` such that ``target pixels = scale * source pixels + shift``."""

    def from_unit(value_range) -> tuple[torch.Tensor, torch.Tensor]:  # [0, 1] pixels -> value_range: a * u + b
        if value_range == "imagenet":
            std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
            return 1 / std, -mean / std
        lo, hi = (float(v) for v in value_range)
        return torch.full((channels,), hi - lo), torch.full((channels,), lo)

    a_src, b_src = from_unit(source)
    a_dst, b_dst = from_unit(target)
    scale = a_dst / a_src
    return scale, b_dst - scale * b_src


class InputRenormalization(torch.nn.Module):
    """Feeds ``model`` images in its own value range: ``model(scale * x + shift, ...)`` per channel.

    For a teacher trained with other input statistics than its student (ImageNet mean / std vs [-1, 1]); exact at
    every patch size, and one elementwise op per batch.
    """

    def __init__(self, model: torch.nn.Module, source: ValueRange, target: ValueRange):
        super().__init__()
        self.model = model
        scale, shift = value_range_affine(as_value_range(source), as_value_range(target))
        self.register_buffer("scale", scale[:, None, None], persistent=False)
        self.register_buffer("shift", shift[:, None, None], persistent=False)

    def forward(self, images: torch.Tensor, *args, **kwargs):
        return self.model(images * self.scale + self.shift, *args, **kwargs)


def as_value_range(value_range) -> ValueRange:
    """A value range from a config (JSON gives lists back for tuples)."""
    return tuple(value_range) if isinstance(value_range, list) else value_range
