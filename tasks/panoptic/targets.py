"""Panoptic data: COCO panoptic files in and out, and UViM's two-channel target (docs/reference.md §10).

UViM predicts, per pixel, a semantic class (0 = void) and an instance id for *every* segment, things and stuff alike.
The instance ids carry no meaning of their own, so they are made canonical after augmentation: renumbered 1..N by
the segments' centroids in raster order (top to bottom, then left to right), which gives the model one target per
image however the annotation numbered its segments.

    read_coco_panoptic(json, png_dir, image_dir)  -> PanopticDataset of (PIL image, semantic (H, W), instance (H, W))
    canonical_instances(instance)                 -> the same segments numbered 1..N by centroid
    write_coco_panoptic(...)                      -> predictions as COCO panoptic PNGs + JSON (for pq_compute)
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from flexivit.files import atomic_write_text
from tasks.common.images import open_image
from tasks.common.scenes import panoptic_ids, panoptic_rgb

VOID = 0  # semantic class and instance id of unlabelled pixels (and of crowd regions, which PQ ignores)


class PanopticDataError(ValueError):
    """A COCO panoptic file that does not say what the format promises; the message names the file and segment."""


class PanopticDataWarning(UserWarning):
    """Something in a COCO panoptic file that is left out (images without an annotation entry), with its count."""


@dataclass(frozen=True)
class PanopticRecord:
    image_id: int
    image: Path
    png: Path
    height: int
    width: int
    segments: tuple[tuple[int, int, bool], ...]  # (segment id in the PNG, contiguous class 1..K, iscrowd)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PanopticDataError(f"{path}: not a readable COCO panoptic JSON ({err})") from err
    if not isinstance(data, dict):
        raise PanopticDataError(f"{path}: a COCO panoptic JSON is an object, this one is a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise PanopticDataError(f"{path}: missing key {key!r} (COCO panoptic: images, annotations, categories)")
        if not isinstance(data[key], list):
            raise PanopticDataError(f"{path}: {key!r} must be a list, it is a {type(data[key]).__name__}")
    return data


def _check(entry, fields: dict, what: str, path: Path) -> None:
    """Raise naming the file and the entry when ``entry`` is no object, lacks one of ``fields`` (key -> type) or
    holds a value of another type: every key the reader uses is checked here, so none fails later as a KeyError."""
    if not isinstance(entry, dict):
        raise PanopticDataError(f"{path}: {what} is not an object: {str(entry)[:200]}")
    missing = [key for key in fields if key not in entry]
    if missing:
        raise PanopticDataError(f"{path}: {what} lacks {missing}: {str(entry)[:200]}")
    wrong = [
        f"{key} {entry[key]!r} (expected {kind.__name__})"
        for key, kind in fields.items()
        if not isinstance(entry[key], kind) or (kind is int and isinstance(entry[key], bool))
    ]
    if wrong:
        raise PanopticDataError(f"{path}: {what} has {', '.join(wrong)}")


def _unique(ids: list, what: str, path: Path) -> None:
    repeated = [i for i, count in Counter(ids).items() if count > 1]
    if repeated:
        raise PanopticDataError(f"{path}: {what} {sorted(repeated)[:8]} appear(s) more than once")


class PanopticDataset(Dataset):
    """COCO panoptic images with their labels: item ``i`` is ``(image, semantic, instance)``.

    ``semantic`` (H, W) int64 holds the contiguous class 1..K (``classes[k - 1]`` names it; 0 = void and crowd);
    ``instance`` (H, W) int64 numbers the image's non-crowd segments 1..N in the JSON's order (0 = void); pass it
    through :func:`canonical_instances` after augmentation. ``transform(image, semantic, instance)`` runs if given.
    """

    def __init__(self, records, classes, isthing, category_ids, json_path, transform=None, colors=None):
        self.records, self.classes, self.isthing = list(records), list(classes), list(isthing)
        self.category_ids, self.json_path, self.transform = list(category_ids), Path(json_path), transform
        self.colors = list(colors) if colors is not None else [None] * len(self.classes)  # [r, g, b] or None

    def categories(self) -> list[dict]:
        """Class k's category as ``categories()[k - 1]``: id, name, isthing and the JSON's colour (or None), plain
        values that a checkpoint can hold (what predictions are labelled and coloured with)."""
        return [
            {"id": i, "name": name, "isthing": thing, "color": color}
            for i, name, thing, color in zip(self.category_ids, self.classes, self.isthing, self.colors, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.records)

    def labels(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(semantic, instance)`` of record ``index``, checked against its JSON entry."""
        record = self.records[index]
        png = open_image(record.png)
        if png.size != (record.width, record.height):
            raise PanopticDataError(
                f"{record.png}: the PNG is {png.size[0]}x{png.size[1]}, its image {record.image_id} is "
                f"{record.width}x{record.height} in {self.json_path}"
            )
        ids = panoptic_ids(np.asarray(png))
        semantic = np.zeros(ids.shape, np.int64)
        instance = np.zeros(ids.shape, np.int64)
        listed = {segment_id for segment_id, _, _ in record.segments}
        present = set(np.unique(ids).tolist()) - {0}
        if present - listed:
            raise PanopticDataError(
                f"{record.png}: segment id(s) {sorted(present - listed)[:8]} are in the PNG but not in the "
                f"segments_info of image {record.image_id} in {self.json_path}"
            )
        if listed - present:
            raise PanopticDataError(
                f"{self.json_path}: image {record.image_id} lists segment id(s) {sorted(listed - present)[:8]} that "
                f"{record.png} does not contain"
            )
        number = 0
        for segment_id, label, crowd in record.segments:
            mask = ids == segment_id
            if crowd:
                continue  # void for training; PQ ignores crowd regions too (docs/reference.md §10)
            number += 1
            semantic[mask], instance[mask] = label, number
        return torch.from_numpy(semantic), torch.from_numpy(instance)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = open_image(record.image)  # a missing, corrupt or oversized file is an ImageError naming it
        if image.size != (record.width, record.height):
            raise PanopticDataError(
                f"{record.image}: {image.size[0]}x{image.size[1]}, but {self.json_path} says "
                f"{record.width}x{record.height} for image {record.image_id}"
            )
        semantic, instance = self.labels(index)
        if self.transform is not None:
            return self.transform(image, semantic, instance)
        return image, semantic, instance


def read_coco_panoptic(json_path: str | Path, png_dir: str | Path, image_dir: str | Path) -> PanopticDataset:
    """A COCO panoptic split: ``json_path`` (``panoptic_{split}.json``), its PNG folder and the images' folder.

    Every entry is checked (an error names the file and the entry). An image listed without an annotation entry
    has no ground truth: it is left out, as panopticapi's ``pq_compute`` (which scores the annotations) leaves it
    out, and a :class:`PanopticDataWarning` gives their number and the first file names.
    """
    json_path, png_dir, image_dir = Path(json_path), Path(png_dir), Path(image_dir)
    data = _load_json(json_path)
    for k, category in enumerate(data["categories"]):
        name = f" ({category['name']!r})" if isinstance(category, dict) and "name" in category else ""
        _check(category, {"id": int, "name": str}, f"category {k}{name}", json_path)
    _unique([c["id"] for c in data["categories"]], "category id(s)", json_path)
    for category in data["categories"]:
        color = category.get("color")
        if color is not None and not (
            isinstance(color, list) and len(color) == 3 and all(type(v) is int and 0 <= v <= 255 for v in color)
        ):
            raise PanopticDataError(f"{json_path}: category {category['id']} has color {color!r} (expected [r, g, b])")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: k + 1 for k, c in enumerate(categories)}  # contiguous 1..K; 0 is void
    for k, image in enumerate(data["images"]):
        _check(image, {"id": int, "file_name": str, "height": int, "width": int}, f"image entry {k}", json_path)
    _unique([image["id"] for image in data["images"]], "image id(s)", json_path)
    images = {image["id"]: image for image in data["images"]}
    annotation_fields = {"image_id": int, "file_name": str, "segments_info": list}
    for k, ann in enumerate(data["annotations"]):
        _check(ann, annotation_fields, f"annotation {k}", json_path)
    _unique([ann["image_id"] for ann in data["annotations"]], "annotations of image id(s)", json_path)
    records = []
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise PanopticDataError(f"{json_path}: annotation {ann['file_name']} names unknown image {ann['image_id']}")
        segments = []
        for k, segment in enumerate(ann["segments_info"]):
            _check(segment, {"id": int}, f"segment {k} of image {ann['image_id']}", json_path)
            if segment.get("category_id") not in index:
                raise PanopticDataError(
                    f"{json_path}: segment {segment['id']} of image {ann['image_id']} has category id "
                    f"{segment.get('category_id')!r}, not one of the JSON's categories {sorted(index)}"
                )
            segments.append((segment["id"], index[segment["category_id"]], bool(segment.get("iscrowd", 0))))
        image = images[ann["image_id"]]
        records.append(
            PanopticRecord(
                image_id=ann["image_id"],
                image=image_dir / image["file_name"],
                png=png_dir / ann["file_name"],
                height=image["height"],
                width=image["width"],
                segments=tuple(segments),
            )
        )
    unannotated = sorted(set(images) - {record.image_id for record in records})
    if unannotated:
        names = [images[i]["file_name"] for i in unannotated[:5]]
        warnings.warn(
            f"{json_path}: {len(unannotated)} of {len(images)} images have no annotation entry and are left out "
            f"(no ground truth to train on or to score): {', '.join(names)}{', ...' if len(unannotated) > 5 else ''}",
            PanopticDataWarning,
            stacklevel=2,
        )
    records.sort(key=lambda r: r.image_id)
    return PanopticDataset(
        records,
        classes=[c["name"] for c in categories],
        isthing=[bool(c.get("isthing", 1)) for c in categories],
        category_ids=[c["id"] for c in categories],
        json_path=json_path,
        colors=[c.get("color") for c in categories],
    )


def canonical_instances(instance: torch.Tensor, max_instances: int | None = None) -> torch.Tensor:
    """Renumber the segments of ``instance`` (H, W) 1..N by centroid in raster order (row, then column); 0 stays 0.

    Ties (equal centroids) go to the segment whose first pixel in raster order comes first, so the result depends
    on the pixels only, never on the input's numbering. Segments beyond ``max_instances`` (UViM has 100 instance
    channels) become void.
    """
    flat = instance.reshape(-1)
    ids, inverse = torch.unique(flat, return_inverse=True)
    keep = ids != VOID
    if not keep.any():
        return torch.zeros_like(instance)
    width = instance.shape[-1]
    position = torch.arange(flat.numel(), device=flat.device)
    rows, cols = (position // width).double(), (position % width).double()
    count = torch.zeros(len(ids), dtype=torch.float64, device=flat.device).index_add_(0, inverse, torch.ones_like(rows))
    cy = torch.zeros_like(count).index_add_(0, inverse, rows) / count
    cx = torch.zeros_like(count).index_add_(0, inverse, cols) / count
    first = torch.full((len(ids),), flat.numel(), dtype=torch.long, device=flat.device).scatter_reduce_(
        0, inverse, position, reduce="amin"
    )
    order = sorted(torch.nonzero(keep).flatten().tolist(), key=lambda k: (cy[k].item(), cx[k].item(), first[k].item()))
    if max_instances is not None:
        order = order[:max_instances]
    new_id = torch.zeros(len(ids), dtype=flat.dtype, device=flat.device)
    new_id[torch.tensor(order, dtype=torch.long, device=flat.device)] = torch.arange(
        1, len(order) + 1, dtype=flat.dtype, device=flat.device
    )
    return new_id[inverse].view_as(instance)


def segments_from_prediction(semantic: np.ndarray, instance: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """A prediction's (semantic, instance) maps -> (PNG segment ids (H, W), segments_info without category ids).

    Segments are keyed by ``semantic * 1000 + instance`` (docs/reference.md §10); pixels of semantic class 0 are
    void. Returned segments carry the contiguous class as ``"class"``; map it to a category id to write them.
    """
    semantic, instance = np.asarray(semantic, np.int64), np.asarray(instance, np.int64)
    if semantic.shape != instance.shape:
        raise ValueError(f"semantic {semantic.shape} and instance {instance.shape} maps differ in shape")
    if (instance < 0).any() or (instance >= 1000).any():
        raise ValueError("instance ids must lie in 0..999 (the segment key is semantic * 1000 + instance)")
    key = np.where(semantic > 0, semantic * 1000 + instance, 0)
    keys = np.unique(key[key > 0])
    ids = np.zeros(key.shape, np.int64)
    labelled = key > 0
    ids[labelled] = np.searchsorted(keys, key[labelled]) + 1
    areas = np.bincount(ids.ravel(), minlength=len(keys) + 1)[1:]
    segments = [
        {"id": n + 1, "class": int(k // 1000), "area": int(area)}
        for n, (k, area) in enumerate(zip(keys.tolist(), areas.tolist(), strict=True))
    ]
    return ids, segments


def encode_prediction(image_id: int, file_name: str, semantic: np.ndarray, instance: np.ndarray, category_ids):
    """One prediction as COCO panoptic: ``(annotation, PNG bytes)``, small enough to gather across processes
    (``category_ids[k - 1]`` is class k's id)."""
    ids, segments = segments_from_prediction(semantic, instance)
    png = io.BytesIO()
    Image.fromarray(panoptic_rgb(ids)).save(png, format="PNG")
    info = [{"id": s["id"], "category_id": int(category_ids[s["class"] - 1]), "area": s["area"]} for s in segments]
    annotation = {"image_id": image_id, "file_name": Path(file_name).with_suffix(".png").name, "segments_info": info}
    return annotation, png.getvalue()


def write_encoded_panoptic(encoded, out_json: str | Path, out_dir: str | Path, gt_json: str | Path | None = None):
    """Write :func:`encode_prediction`'s ``(annotation, PNG bytes)`` pairs: the PNGs in ``out_dir``, their JSON at
    ``out_json`` (the categories, and the entries of the predicted images, copied from ``gt_json`` when given), the
    JSON atomically: never half a file."""
    out_json, out_dir = Path(out_json), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for annotation, png in encoded:
        (out_dir / annotation["file_name"]).write_bytes(png)
    data = {"annotations": [annotation for annotation, _ in encoded]}
    if gt_json is not None:
        gt = _load_json(Path(gt_json))
        predicted = {annotation["image_id"] for annotation, _ in encoded}
        data.update(images=[image for image in gt["images"] if image["id"] in predicted], categories=gt["categories"])
    atomic_write_text(out_json, json.dumps(data))
    return out_json


def write_coco_panoptic(
    predictions, category_ids, out_json: str | Path, out_dir: str | Path, gt_json: str | Path | None = None
) -> Path:
    """Write ``predictions`` — ``(image_id, file_name, semantic, instance)`` — as COCO panoptic PNGs in ``out_dir``
    and their JSON at ``out_json`` (see :func:`write_encoded_panoptic`)."""
    encoded = [encode_prediction(*prediction, category_ids) for prediction in predictions]
    return write_encoded_panoptic(encoded, out_json, out_dir, gt_json)
