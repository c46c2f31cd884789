"""Joint image + mask transforms of the Segmenter / mmseg recipe, with torchvision v2 and tv_tensors.

Training (mmseg's ADE20k pipeline): random resize (keeping the aspect ratio) -> random crop that no single class
fills beyond ``cat_max_ratio`` -> horizontal flip -> photometric jitter (image only) -> normalise -> pad to the crop
(image 0, mask 255). Masks are resized with nearest neighbours: tv_tensors.Mask tells v2 to do so. All randomness
comes from torch's global generator, which the loader seeds per item (tasks/common/loader.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tasks.common.transforms import normalize

from .data import IGNORE_INDEX


def _image_of(flat_inputs: list[Any]) -> tv_tensors.Image:
    return next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))


def rescale_size(image_hw: Sequence[int], scale: Sequence[int] | None, ratio: float = 1.0) -> tuple[int, int]:
    """mmseg's keep-ratio resize: the largest size within ``scale * ratio`` = (long side, short side) bounds.

    ``scale=None`` multiplies the image's own size by ``ratio``.
    """
    h, w = image_hw
    if scale is None:
        factor = ratio
    else:
        long_side, short_side = max(scale) * ratio, min(scale) * ratio
        factor = min(long_side / max(h, w), short_side / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


class RandomRescale(v2.Transform):
    """Resize keeping the aspect ratio to ``scale`` times a ratio drawn uniformly from ``ratio_range``."""

    def __init__(self, scale: Sequence[int] | None, ratio_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        self.scale, self.ratio_range = scale, tuple(ratio_range)

    def make_params(self, flat_inputs: list[Any]) -> dict:
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        return {"size": rescale_size(_image_of(flat_inputs).shape[-2:], self.scale, ratio)}

    def transform(self, inpt: Any, params: dict) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


class CategoryBalancedCrop(v2.Transform):
    """mmseg's RandomCrop: a ``crop`` window (smaller if the image is), re-drawn up to 10 times while one class covers
    ``cat_max_ratio`` or more of its labelled pixels (or it holds a single class)."""

    def __init__(self, crop: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.crop, self.cat_max_ratio, self.ignore_index = crop, cat_max_ratio, ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict:
        h, w = _image_of(flat_inputs).shape[-2:]
        ch, cw = min(self.crop, h), min(self.crop, w)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        for _ in range(10):
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            if mask is None or self.cat_max_ratio >= 1.0:
                break
            labels = mask[..., top : top + ch, left : left + cw].flatten()
            counts = torch.bincount(labels[labels != self.ignore_index].long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


class PadToSize(v2.Transform):
    """Pad at the bottom and right to ``size``: images with 0 (after normalisation: the mean), masks with 255."""

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.ignore_index = size, ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict:
        h, w = _image_of(flat_inputs).shape[-2:]
        return {"padding": [0, 0, max(0, self.size - w), max(0, self.size - h)]}

    def transform(self, inpt: Any, params: dict) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0.0
        return self._call_kernel(TF.pad, inpt, padding=params["padding"], fill=fill)


def _to_tv(image: Image.Image, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    return tv_tensors.Image(TF.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))


class TrainTransform:
    """``(PIL image, uint8 mask) -> (float image (3, crop, crop), int64 mask (crop, crop))``, mmseg's train pipeline.

    ``photometric`` stands in for mmseg's PhotoMetricDistortion (brightness +-32 levels, contrast and saturation
    0.5-1.5, hue +-18 of 180) with torchvision's ColorJitter at the same ranges (brightness as a factor).
    """

    def __init__(
        self,
        *,
        crop: int,
        scale: Sequence[int] | None,
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: bool = True,
        photometric: bool = True,
        value_range: Sequence[float] | str = (-1.0, 1.0),
    ):
        steps = [RandomRescale(scale, ratio_range), CategoryBalancedCrop(crop, cat_max_ratio)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if photometric:
            steps.append(v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 180))
        steps += [
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            normalize(value_range),
            PadToSize(crop),
            v2.ToPureTensor(),
        ]
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.pipeline(*_to_tv(image, mask))
        return image, mask.long()


class EvalTransform:
    """``(PIL image, uint8 mask) -> (float image resized to fit ``scale``, int64 mask at its original size)``.

    As mmseg's test pipeline: the image is resized keeping its ratio (``scale=None`` keeps it as it is) and the
    prediction is resized back to the label (see :func:`~tasks.segmentation.inference.predict`).
    """

    def __init__(self, *, scale: Sequence[int] | None, value_range: Sequence[float] | str = (-1.0, 1.0)):
        self.scale = scale
        self.to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True), normalize(value_range), v2.ToPureTensor()])

    def image(self, image: Image.Image) -> torch.Tensor:
        """The image alone (a user's image, which has no label): float (3, h, w) resized to fit ``scale``."""
        image = TF.pil_to_tensor(image)
        if self.scale is not None:
            image = TF.resize(image, list(rescale_size(image.shape[-2:], self.scale)), antialias=True)
        return self.to_float(image)

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(image), torch.from_numpy(np.ascontiguousarray(mask)).long()
