"""Detection annotations (COCO, LVIS v1, labelme's COCO export) -> :class:`DetectionDataset`; rare-class removal.

Classes are contiguous indices ``0..C-1`` over the categories sorted by JSON id (``category_ids[i]`` maps back).
An item is ``(image, target)``: ``image`` a uint8 tensor (3, H, W), ``target`` a dict with ``image_id`` (the JSON
id), ``boxes`` (tv_tensors.BoundingBoxes, XYXY pixels), ``labels`` (M, C) bool multi-hot (an LVIS instance may
carry several classes after IoU >= 0.9 merging), ``negatives`` and ``not_exhaustive`` (C,) bool, ``orig_size``.

LVIS is federated (Gupta et al. 2019): an image's annotations are exhaustive only for its positive classes; the
classes in ``neg_category_ids`` are verified absent; everything else is unknown. OWL-ViT (docs/reference.md §8) trains
each image on a query set of its positives, its verified negatives and random frequency-weighted negatives
(tasks/detection/queries.py), removes the rare classes from training (:func:`remove_classes`) so that APr is zero-shot.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file

from flexivit.files import atomic_write_text

# Debian package labelme-examples (tools/setup.sh installs it): three VOC photos with COCO instance polygons.
LABELME_COCO_ROOT = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")
MERGE_IOU = 0.9  # OWL-ViT: LVIS boxes overlapping this much are one object with several names
LVIS_FREQUENCY_THRESHOLDS = (10, 100)  # LVIS v1: rare <= 10 training images, common <= 100, frequent above


@dataclass(frozen=True)
class ImageRecord:
    """One image's annotations, after validation, clipping and merging."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # (M, 4) float32 [x, y, w, h] pixels, clipped to the image
    classes: tuple[tuple[int, ...], ...]  # per instance, its contiguous class indices (sorted, non-empty)
    negatives: tuple[int, ...] = ()  # verified absent (LVIS neg_category_ids)
    not_exhaustive: tuple[int, ...] = ()  # LVIS not_exhaustive_category_ids


class DetectionDataset(Dataset):
    """Images with boxes and (multi-)labels; ``transform(image, target)`` is applied in ``__getitem__`` if given.

    ``excluded`` holds the classes removed for training (never positives, never queries); ``exhaustive`` is True
    for COCO-style sets, where every class absent from an image's annotations is a valid negative.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        classes: Sequence[str],
        category_ids: Sequence[int],
        *,
        frequency: Sequence[str] | None = None,
        image_count: Sequence[int] | None = None,
        json_path: str | Path | None = None,
        exhaustive: bool = True,
        excluded: Iterable[int] = (),
        transform: Callable | None = None,
    ):
        self.records, self.classes, self.category_ids = list(records), list(classes), list(category_ids)
        self.frequency = None if frequency is None else list(frequency)
        if image_count is None:  # images per class, counted from the records themselves
            counts = Counter(c for r in self.records for c in {c for cs in r.classes for c in cs})
            image_count = [counts[c] for c in range(len(self.classes))]
        self.image_count = np.asarray(image_count, np.int64)
        self.json_path = None if json_path is None else Path(json_path)
        self.exhaustive, self.excluded, self.transform = exhaustive, frozenset(excluded), transform

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_transform(self, transform: Callable | None) -> DetectionDataset:
        """The same data with another ``transform`` (e.g. the eval transform for validation)."""
        return self._with(self.records, transform=transform)

    def take(self, n: int) -> DetectionDataset:
        """The first ``n`` images (the JSON's order), for small runs; the class statistics stay the full set's."""
        return self._with(self.records[:n])

    def _with(self, records, **changes) -> DetectionDataset:
        fields = dict(
            frequency=self.frequency,
            image_count=self.image_count,
            json_path=self.json_path,
            exhaustive=self.exhaustive,
            excluded=self.excluded,
            transform=self.transform,
        )
        return DetectionDataset(records, self.classes, self.category_ids, **{**fields, **changes})

    def load(self, index: int) -> tuple[torch.Tensor, dict]:
        """The raw item (no transform): what mosaics draw their extra cells from."""
        r = self.records[index]
        try:
            image = decode_image(read_file(str(r.path)), mode=ImageReadMode.RGB)  # (3, H, W) uint8
        except (RuntimeError, OSError, ValueError) as e:
            raise ValueError(f"cannot decode image {r.path} (image id {r.image_id}): {e}") from e
        if tuple(image.shape[-2:]) != (r.height, r.width):
            raise ValueError(
                f"image {r.path} (image id {r.image_id}) is {image.shape[-2]}x{image.shape[-1]} (h x w) but "
                f"{self.json_path} says {r.height}x{r.width}; its boxes would be wrong"
            )
        c = self.num_classes
        xyxy = np.concatenate([r.boxes[:, :2], r.boxes[:, :2] + r.boxes[:, 2:]], axis=1) if len(r.boxes) else r.boxes
        labels = torch.zeros(len(r.classes), c, dtype=torch.bool)
        for m, classes in enumerate(r.classes):
            labels[m, list(classes)] = True
        target = {
            "image_id": r.image_id,
            "boxes": tv_tensors.BoundingBoxes(
                torch.as_tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(r.height, r.width),
            ),
            "labels": labels,
            "negatives": class_mask(r.negatives, c),
            "not_exhaustive": class_mask(r.not_exhaustive, c),
            "orig_size": (r.height, r.width),
        }
        return image, target

    def __getitem__(self, index: int):
        image, target = self.load(index)
        return (image, target) if self.transform is None else self.transform(image, target)


def class_mask(indices: Iterable[int], size: int) -> torch.Tensor:
    """(size,) bool, True at ``indices``."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[list(indices)] = True
    return mask


# ------------------------------------------------------------------------------------------------ reading


def _load_json(json_path: Path) -> dict:
    if not json_path.is_file():
        raise FileNotFoundError(f"annotation file {json_path} not found")
    try:
        with open(json_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{json_path}: no {key!r} list (COCO format: images, annotations, categories)")
    return data


def _get(obj: Any, key: str, where: str, json_path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{json_path}: {where} has no {key!r} key")
    return obj[key]


def clean_coco(
    data: dict, json_path: str | Path, *, renumber_zero_ids: bool = False, drop_categories: Sequence[str] = ()
) -> dict:
    """A copy of a COCO dict with the named categories and their annotations dropped and, if any annotation id is 0,
    all annotation ids renumbered 1..K in file order.

    labelme's COCO export numbers annotations from 0 and adds a ``_background_`` category; pycocotools' COCOeval
    stores the matched ground-truth id per detection and reads 0 as "unmatched", so a match to annotation 0 would
    count as a false positive (ARCHITECTURE.md, "Real data").
    """
    json_path = Path(json_path)
    drop = set(drop_categories)
    dropped_ids = {_get(c, "id", "a category", json_path) for c in data["categories"] if c.get("name") in drop}
    categories = [c for c in data["categories"] if c.get("name") not in drop]
    annotations = [a for a in data["annotations"] if a.get("category_id") not in dropped_ids]
    if renumber_zero_ids and any(a.get("id") == 0 for a in annotations):
        annotations = [{**a, "id": k} for k, a in enumerate(annotations, start=1)]
    return {**data, "categories": categories, "annotations": annotations}


def clean_coco_json(
    json_in: str | Path,
    json_out: str | Path,
    *,
    renumber_zero_ids: bool = True,
    drop_categories: Sequence[str] = ("_background_",),
) -> Path:
    """Write :func:`clean_coco` of ``json_in`` to ``json_out`` (atomically): a ground truth COCOeval can score."""
    data = clean_coco(
        _load_json(Path(json_in)), json_in, renumber_zero_ids=renumber_zero_ids, drop_categories=drop_categories
    )
    return _write_json_atomic(Path(json_out), data)


def read_coco(
    json_path: str | Path,
    image_root: str | Path,
    *,
    renumber_zero_ids: bool = False,
    drop_categories: Sequence[str] = (),
    transform: Callable | None = None,
) -> DetectionDataset:
    """A COCO instances JSON; ``file_name`` is relative to ``image_root``. Every absent class is a valid negative."""
    return _read(
        Path(json_path),
        Path(image_root),
        lvis=False,
        merge_iou=None,
        renumber_zero_ids=renumber_zero_ids,
        drop_categories=drop_categories,
        transform=transform,
    )


def read_lvis(
    json_path: str | Path,
    image_root: str | Path,
    *,
    merge_iou: float | None = MERGE_IOU,
    transform: Callable | None = None,
) -> DetectionDataset:
    """An LVIS v1 JSON (federated: neg_category_ids, not_exhaustive_category_ids, category frequency).

    Images may name their file by ``file_name`` (relative to ``image_root``) or, as in LVIS v1, by ``coco_url``: then
    the file is ``image_root/<split>/<name>`` when that folder exists (LVIS v1 val mixes COCO train2017 and val2017
    images; detectron2's layout) and ``image_root/<name>`` otherwise. Boxes with IoU >= ``merge_iou`` in one image
    become one instance with all their classes (None: no merging).
    """
    return _read(
        Path(json_path),
        Path(image_root),
        lvis=True,
        merge_iou=merge_iou,
        renumber_zero_ids=False,
        drop_categories=(),
        transform=transform,
    )


def read_labelme_coco(root: str | Path = LABELME_COCO_ROOT, transform: Callable | None = None) -> DetectionDataset:
    """labelme's instance-segmentation example (``annotations.json`` + ``JPEGImages/``): annotation id 0 renumbered,
    the ``_background_`` category dropped."""
    root = Path(root)
    return read_coco(
        root / "annotations.json",
        root,
        renumber_zero_ids=True,
        drop_categories=("_background_",),
        transform=transform,
    )


def read_scenes(root: str | Path, split: str, kind: str = "lvis", transform: Callable | None = None):
    """The Fashion-MNIST scenes of tasks/common/scenes.py (``kind`` "lvis" or "coco", ``split`` "train" or "val")."""
    from tasks.common.scenes import SPLITS

    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown scenes split {split!r}; valid: {', '.join(SPLITS)}")
    images = root / "images" / SPLITS[split][1]
    if kind == "lvis":
        return read_lvis(root / "lvis" / f"lvis_{split}.json", images, transform=transform)
    if kind == "coco":
        return read_coco(root / "coco" / f"instances_{split}.json", images, transform=transform)
    raise ValueError(f"unknown scenes annotation kind {kind!r}; valid: lvis, coco")


def _read(
    json_path: Path,
    image_root: Path,
    *,
    lvis: bool,
    merge_iou: float | None,
    renumber_zero_ids: bool,
    drop_categories: Sequence[str],
    transform: Callable | None,
) -> DetectionDataset:
    raw = _load_json(json_path)
    data = clean_coco(raw, json_path, renumber_zero_ids=renumber_zero_ids, drop_categories=drop_categories)
    dropped = len(raw["annotations"]) - len(data["annotations"])

    # Categories: contiguous index = rank of the JSON id.
    categories: dict[int, dict] = {}
    for cat in data["categories"]:
        cat_id = _get(cat, "id", "a category", json_path)
        _get(cat, "name", f"category id {cat_id}", json_path)
        if cat_id in categories:
            raise ValueError(f"{json_path}: duplicate category id {cat_id}")
        if lvis:
            freq = _get(cat, "frequency", f"category id {cat_id}", json_path)
            if freq not in ("r", "c", "f"):
                raise ValueError(f"{json_path}: category id {cat_id} has frequency {freq!r}; expected r, c or f")
        categories[cat_id] = cat
    category_ids = sorted(categories)
    index_of = {cat_id: i for i, cat_id in enumerate(category_ids)}

    def class_index(cat_id, where: str) -> int:
        if cat_id not in index_of:
            known = ", ".join(map(str, category_ids[:10])) + (", ..." if len(category_ids) > 10 else "")
            raise ValueError(f"{json_path}: {where} has unknown category id {cat_id} (known ids: {known})")
        return index_of[cat_id]

    # Images.
    folders: dict[str, bool] = {}  # coco_url split folder -> exists under image_root

    def image_path(image: dict, image_id) -> Path:
        if "file_name" in image:
            return image_root / image["file_name"]
        if "coco_url" in image:
            parts = str(image["coco_url"]).rstrip("/").split("/")
            if len(parts) >= 2:
                if parts[-2] not in folders:
                    folders[parts[-2]] = (image_root / parts[-2]).is_dir()
                if folders[parts[-2]]:
                    return image_root / parts[-2] / parts[-1]
            return image_root / parts[-1]
        raise ValueError(f"{json_path}: image id {image_id} has neither 'file_name' nor 'coco_url'")

    images: dict[int, dict] = {}
    for image in data["images"]:
        image_id = _get(image, "id", "an image", json_path)
        if image_id in images:
            raise ValueError(f"{json_path}: duplicate image id {image_id}")
        where = f"image id {image_id}"
        height, width = (int(_get(image, key, where, json_path)) for key in ("height", "width"))
        if height <= 0 or width <= 0:
            raise ValueError(f"{json_path}: {where} has size {height}x{width}")
        negatives = not_exhaustive = ()
        if lvis:
            negatives = tuple(
                sorted({class_index(c, where) for c in _get(image, "neg_category_ids", where, json_path)})
            )
            not_exhaustive = tuple(
                sorted({class_index(c, where) for c in _get(image, "not_exhaustive_category_ids", where, json_path)})
            )
        images[image_id] = dict(
            path=image_path(image, image_id),
            height=height,
            width=width,
            negatives=negatives,
            not_exhaustive=not_exhaustive,
        )

    # Annotations: validated, degenerate ones skipped (as COCO loaders do: detectron2, torchvision's reference
    # scripts), partly outside ones clipped to the image.
    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
    seen: set = set()
    skipped: Counter = Counter()
    for ann in data["annotations"]:
        ann_id = _get(ann, "id", "an annotation", json_path)
        if ann_id in seen:
            raise ValueError(f"{json_path}: duplicate annotation id {ann_id}")
        seen.add(ann_id)
        where = f"annotation id {ann_id}"
        image_id = _get(ann, "image_id", where, json_path)
        category = class_index(_get(ann, "category_id", where, json_path), where)
        bbox = _get(ann, "bbox", where, json_path)
        if image_id not in images:
            raise ValueError(f"{json_path}: {where} refers to image id {image_id}, which is not in 'images'")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            raise ValueError(f"{json_path}: {where} has bbox {bbox!r}; expected [x, y, w, h] numbers")
        if not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"{json_path}: {where} has a non-finite bbox {bbox}")
        # Crowd regions (iscrowd=1) box a group of objects as one: COCOeval treats them as ignore regions, and a
        # one-to-one matched detector trained on them learns to fire one box at a crowd (DETR and detectron2 drop
        # them from training targets too).
        if ann.get("iscrowd", 0):
            skipped["crowd (iscrowd=1)"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            skipped["zero-area"] += 1
            continue
        size = images[image_id]
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(size["width"])), min(y + h, float(size["height"]))
        if x1 <= x0 or y1 <= y0:
            skipped["outside the image"] += 1
            continue
        per_image[image_id].append(([x0, y0, x1 - x0, y1 - y0], category))
    if skipped:
        detail = ", ".join(f"{n} {why}" for why, n in skipped.items())
        print(f"skipped {sum(skipped.values())} annotations of {json_path}: {detail}", flush=True)
    if dropped:
        print(f"dropped {dropped} annotations of the categories {list(drop_categories)} of {json_path}", flush=True)

    records = []
    for image_id, info in images.items():
        anns = per_image[image_id]
        boxes = np.asarray([b for b, _ in anns], np.float32).reshape(-1, 4)
        classes = [(c,) for _, c in anns]
        if merge_iou is not None and len(anns) > 1:
            boxes, classes = _merge(boxes, classes, merge_iou)
        records.append(ImageRecord(image_id=image_id, boxes=boxes, classes=tuple(classes), **info))

    counts = [categories[c].get("image_count") for c in category_ids]
    return DetectionDataset(
        records,
        [categories[c]["name"] for c in category_ids],
        category_ids,
        frequency=[categories[c]["frequency"] for c in category_ids] if lvis else None,
        # LVIS states images per class over its training split; otherwise count them here.
        image_count=counts if lvis and all(isinstance(n, int) for n in counts) else None,
        json_path=json_path,
        exhaustive=not lvis,
        transform=transform,
    )


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (len(a), len(b)) of [x, y, w, h] boxes, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    union = np.prod(a[:, 2:], -1)[:, None] + np.prod(b[:, 2:], -1)[None] - inter
    return inter / np.maximum(union, 1e-12)


def _merge(boxes: np.ndarray, classes: list[tuple[int, ...]], iou: float):
    """Greedy in annotation order: a box joins the first instance whose (first) box overlaps it by IoU >= ``iou``.

    LVIS annotates one object once per synonym-like category (e.g. "mug" and "cup"), and OWL-ViT merges such
    near-duplicates into one multi-label target so the one-to-one matcher does not need two predictions for them.
    """
    overlaps = box_iou_xywh(boxes, boxes)
    owners: list[int] = []  # index of each instance's first box
    merged: list[set[int]] = []
    for m, cls in enumerate(classes):
        for k, owner in enumerate(owners):
            if overlaps[owner, m] >= iou:
                merged[k].update(cls)
                break
        else:
            owners.append(m)
            merged.append(set(cls))
    return boxes[owners], [tuple(sorted(s)) for s in merged]


# ------------------------------------------------------------------------------------------------ rare classes


def _class_indices(dataset: DetectionDataset, names: Iterable[str]) -> set[int]:
    index_of = {n: i for i, n in reversed(list(enumerate(dataset.classes)))}
    names = list(names)
    unknown = [n for n in names if n not in index_of]
    if unknown:
        raise KeyError(f"unknown class names {unknown}; the dataset has {len(dataset.classes)} classes")
    return {index_of[n] for n in names}


def remove_classes(dataset: DetectionDataset, names: Iterable[str], *, drop_images: bool = False) -> DetectionDataset:
    """Training without ``names``: their labels are removed (an instance left with no class is dropped), they leave
    the verified negatives, and they join ``excluded`` so that no query set ever contains them (OWL-ViT's zero-shot
    APr protocol, docs/reference.md §8). Class indices stay as they are.

    ``drop_images``: also drop every image that shows one of them (the strict zero-shot split): otherwise their
    unlabelled instances are trained as background, which with a small training vocabulary teaches the detector to
    score exactly those objects low (docs/detection.md)."""
    drop = _class_indices(dataset, names)
    records = []
    for r in dataset.records:
        if drop_images and any(c in drop for cs in r.classes for c in cs):
            continue
        kept = [(m, tuple(c for c in cs if c not in drop)) for m, cs in enumerate(r.classes)]
        kept = [(m, cs) for m, cs in kept if cs]
        records.append(
            replace(
                r,
                boxes=r.boxes[[m for m, _ in kept]].reshape(-1, 4),
                classes=tuple(cs for _, cs in kept),
                negatives=tuple(c for c in r.negatives if c not in drop),
                not_exhaustive=tuple(c for c in r.not_exhaustive if c not in drop),
            )
        )
    return dataset._with(records, excluded=dataset.excluded | drop)


def mark_rare(
    gt_json_in: str | Path,
    gt_json_out: str | Path,
    names: Iterable[str],
    thresholds: Sequence[int] = LVIS_FREQUENCY_THRESHOLDS,
) -> Path:
    """Copy an LVIS JSON with the categories ``names`` marked rare ('r') and every other one common or frequent by
    its ``image_count`` (counted from the file's annotations where absent), so LVISEval's APr is over ``names``."""
    json_in = Path(gt_json_in)
    data = _load_json(json_in)
    names = set(names)
    known = {c.get("name") for c in data["categories"]}
    if names - known:
        raise KeyError(f"{json_in}: unknown category names {sorted(names - known)}")
    counted = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in data["annotations"]})
    categories = []
    for cat in data["categories"]:
        if cat["name"] in names:
            frequency = "r"
        else:
            count = cat.get("image_count", counted[cat["id"]])
            frequency = "c" if count <= thresholds[1] else "f"
        categories.append({**cat, "frequency": frequency})
    return _write_json_atomic(Path(gt_json_out), {**data, "categories": categories})


def _write_json_atomic(path: Path, obj: Any) -> Path:
    """A reader never sees half a file (flexivit.files.atomic_write_text)."""
    atomic_write_text(path, json.dumps(obj))
    return path
