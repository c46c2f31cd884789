"""Semantic segmentation datasets: ADE20k, Cityscapes and any folder of images + label PNGs.

Every dataset yields ``(image, mask)``: ``image`` an RGB PIL image, ``mask`` a uint8 array (H, W) of class indices
``0..K-1`` with 255 for pixels to ignore (after the dataset's label map: ADE20k's "reduce zero label", Cityscapes'
id -> trainId), or ``transform(image, mask)`` when a joint transform is given. Label PNGs must hold class indices
(mode "L", "P" — the palette index, as in VOC — or 16-bit); colour-coded masks are an error.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from tasks.common.datasets import require_examples
from tasks.common.images import open_image

IGNORE_INDEX = 255

# Cityscapes labels (cityscapesScripts' labels.py): (id, name, trainId); trainId 255 = not evaluated.
CITYSCAPES_LABELS = [
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255), (3, "out of roi", 255),
    (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255), (7, "road", 0), (8, "sidewalk", 1),
    (9, "parking", 255), (10, "rail track", 255), (11, "building", 2), (12, "wall", 3), (13, "fence", 4),
    (14, "guard rail", 255), (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8), (22, "terrain", 9), (23, "sky", 10),
    (24, "person", 11), (25, "rider", 12), (26, "car", 13), (27, "truck", 14), (28, "bus", 15),
    (29, "caravan", 255), (30, "trailer", 255), (31, "train", 16), (32, "motorcycle", 17), (33, "bicycle", 18),
]  # fmt: skip
CITYSCAPES_CLASSES = [name for _, name, train_id in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if train_id != 255]


def cityscapes_train_id_table() -> np.ndarray:
    """A 256-entry lookup table from Cityscapes label ids to train ids (unknown ids, e.g. -1 plates, -> 255)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for label_id, _, train_id in CITYSCAPES_LABELS:
        table[label_id] = train_id
    return table


def reduce_zero_label_table() -> np.ndarray:
    """ADE20k's label map: 0 ("other") -> 255, k -> k - 1 (mmseg's ``reduce_zero_label``)."""
    table = (np.arange(256) - 1).astype(np.uint8)  # 0 - 1 wraps to 255
    table[255] = IGNORE_INDEX
    return table


def read_mask(path: str | Path, label_map: np.ndarray | None = None) -> np.ndarray:
    """A label PNG as a uint8 array (H, W) of class indices, through ``label_map`` (a 256-entry table) if given."""
    image = open_image(path, mode=None)  # as stored: the indices, not colours
    if image.mode not in ("L", "P", "I;16", "I", "1"):
        raise ValueError(f"mask {path} has mode {image.mode}: expected class indices (L, P or 16-bit), not colours")
    mask = np.asarray(image)  # for mode "P": the palette indices, which are the classes (VOC, labelme)
    if mask.dtype != np.uint8:
        if mask.max() > 255:
            raise ValueError(f"mask {path} holds labels above 255 ({mask.max()}); expected class indices")
        mask = mask.astype(np.uint8)
    return mask if label_map is None else label_map[mask]


class SegmentationFolder(Dataset):
    """Pairs of (image file, label file) with class names and an optional label map."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        classes: Sequence[str],
        label_map: np.ndarray | None = None,
        transform: Callable | None = None,
    ):
        self.pairs, self.classes, self.label_map, self.transform = list(pairs), list(classes), label_map, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def take(self, n: int, seed: int = 0) -> SegmentationFolder:
        """``n`` items drawn without replacement (the same for the same ``seed``), in index order."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot take {n} items from a dataset of {len(self)}")
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return SegmentationFolder([self.pairs[i] for i in keep], self.classes, self.label_map, self.transform)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image, mask = open_image(image_path), read_mask(mask_path, self.label_map)
        if image.size != (mask.shape[1], mask.shape[0]):
            raise ValueError(f"{image_path} is {image.size[0]}x{image.size[1]} but its mask is {mask.shape[::-1]}")
        # One comparison per mask: a class id past the head's outputs would otherwise fail inside the loss, unnamed.
        bad = (mask >= len(self.classes)) & (mask != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"mask {mask_path} holds class id {int(mask[bad].max())} (after the label map), outside the "
                f"{len(self.classes)} classes [0, {len(self.classes)}) and not the ignore index {IGNORE_INDEX}"
            )
        return (image, mask) if self.transform is None else self.transform(image, mask)


def pair_by_stem(images: Path, masks: Path, image_suffix: str, mask_suffix: str, stems=None) -> list:
    """``(images/<stem><image_suffix>, masks/<stem><mask_suffix>)`` for every image (or every stem in ``stems``)."""
    for folder in (images, masks):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder {folder} not found")
    if stems is None:
        stems = sorted(p.name[: -len(image_suffix)] for p in images.glob(f"*{image_suffix}"))
    pairs = [(images / f"{s}{image_suffix}", masks / f"{s}{mask_suffix}") for s in stems]
    missing = [str(m) for _, m in pairs if not m.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images have no mask, e.g. {missing[:3]}")
    return pairs


# ---------------------------------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., SegmentationFolder]] = {}


def register(name: str):
    def wrap(builder):
        DATASETS[name] = builder
        return builder

    return wrap


def build_segmentation_dataset(name: str, split: str, root: str | Path, transform=None, **options):
    """Build ``split`` of dataset ``name`` (``ade20k``, ``cityscapes`` or ``folder``) under ``root``."""
    if name not in DATASETS:
        raise KeyError(f"unknown segmentation dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"{name} root folder {root} not found")
    return require_examples(
        DATASETS[name](split, Path(root), transform, **options), f"{name} split {split!r} in {root}"
    )


def _read_class_table(root: Path) -> list[str] | None:
    """Class names from ADE's ``objectInfo150.txt`` (tab-separated) or ``objectInfo150.csv``, in index order."""
    for name, delimiter in (("objectInfo150.txt", "\t"), ("objectInfo150.csv", ",")):
        if (root / name).is_file():
            with open(root / name, newline="") as f:
                rows = list(csv.DictReader(f, delimiter=delimiter))
            rows.sort(key=lambda r: int(r["Idx"]))
            return [r["Name"].split(";")[0].strip() for r in rows]  # "building;edifice" -> "building"
    return None


@register("ade20k")
def ade20k(split: str, root: Path, transform, *, classes: Sequence[str] | None = None, **_) -> SegmentationFolder:
    """ADEChallengeData2016: ``images/{training,validation}/*.jpg`` and ``annotations/.../*.png`` (0 = other).

    Labels are reduced by one with 0 -> ignore (150 classes 0..149). Class names come from ``objectInfo150.txt``
    in ``root`` (it ships with the dataset, and our generated scenes write one), else ``classes``.
    """
    if split not in ("training", "validation"):
        raise ValueError(f"ADE20k splits are 'training' and 'validation', got {split!r}")
    names = _read_class_table(root) or classes
    if not names:
        raise FileNotFoundError(f"{root} has no objectInfo150.txt: give the class names (data.classes)")
    pairs = pair_by_stem(root / "images" / split, root / "annotations" / split, ".jpg", ".png")
    return SegmentationFolder(pairs, names, reduce_zero_label_table(), transform)


@register("cityscapes")
def cityscapes(split: str, root: Path, transform, **_) -> SegmentationFolder:
    """Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine`` labels.

    Uses ``*_gtFine_labelTrainIds.png`` where present (cityscapesScripts' createTrainIdLabelImgs), otherwise converts
    the official ``*_gtFine_labelIds.png`` with the id -> trainId table: 19 classes, everything else ignored.
    """
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no images under {root / 'leftImg8bit' / split}/<city>/*_leftImg8bit.png")
    stem = [str(p.relative_to(root / "leftImg8bit")).removesuffix("_leftImg8bit.png") for p in images]
    train_ids = [root / "gtFine" / f"{s}_gtFine_labelTrainIds.png" for s in stem]
    if all(p.is_file() for p in train_ids):
        return SegmentationFolder(list(zip(images, train_ids, strict=True)), CITYSCAPES_CLASSES, None, transform)
    label_ids = [root / "gtFine" / f"{s}_gtFine_labelIds.png" for s in stem]
    missing = [str(p) for p in label_ids if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} Cityscapes images have no gtFine labels, e.g. {missing[:2]}")
    return SegmentationFolder(
        list(zip(images, label_ids, strict=True)), CITYSCAPES_CLASSES, cityscapes_train_id_table(), transform
    )


@register("folder")
def image_mask_folder(
    split: str,
    root: Path,
    transform,
    *,
    images: str = "images/{split}",
    masks: str = "annotations/{split}",
    image_suffix: str = ".jpg",
    mask_suffix: str = ".png",
    split_file: str | None = None,
    classes: Sequence[str] | None = None,
    reduce_zero_label: bool = False,
    **_,
) -> SegmentationFolder:
    """Any layout of images and label PNGs paired by file name, e.g. VOC (labelme's export) or an ADE-like copy.

    ``images`` / ``masks`` are folders under ``root`` (``{split}`` is replaced by the split); ``split_file`` (e.g.
    VOC's ``ImageSets/Segmentation/{split}.txt``) lists the stems to use. Class names: ``classes``, else
    ``class_names.txt`` in ``root`` (one per line, as labelme writes it).
    """
    stems = None
    if split_file:
        stems = (root / split_file.format(split=split)).read_text().split()
    pairs = pair_by_stem(
        root / images.format(split=split), root / masks.format(split=split), image_suffix, mask_suffix, stems
    )
    names = list(classes or [])
    if not names and (root / "class_names.txt").is_file():
        names = (root / "class_names.txt").read_text().splitlines()
    if not names:
        raise FileNotFoundError(f"no class names: give data.classes or put class_names.txt in {root}")
    label_map = reduce_zero_label_table() if reduce_zero_label else None
    return SegmentationFolder(pairs, names, label_map, transform)
