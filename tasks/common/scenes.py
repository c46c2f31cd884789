"""Scenes composed from real Fashion-MNIST items, written in the real dense-task formats (README, "Set-up").

Dense tasks need more than the three labelme photos to train on a CPU, and nothing may be downloaded here. So a
scene pastes several real Fashion-MNIST items (train items for the training split, test items for validation) at
random positions and scales, tinted, with bounded overlaps, on a textured background of one or two *stuff* regions (a
wall and, usually, a floor below a random horizon). Every label comes from the pixels themselves: an item's mask is
its own non-zero pixels (small holes filled), its anti-aliased fringe is left unlabelled, as VOC and COCO panoptic
leave boundaries void. Backgrounds are dark and items bright, as Fashion-MNIST shows them: a backbone trained on
Fashion-MNIST then transfers in-domain (on light backgrounds the classification main job's model classified crops of
the items at chance level, 11%; on these, 21-26%).

One set of scenes is written in the formats of the real datasets, so the same readers and evaluators serve both:

    <out>/images/{training,validation}/scene_000000.jpg      ADEChallengeData2016 layout (semantic segmentation):
    <out>/annotations/{training,validation}/scene_000000.png  PNG of category ids, 0 = unlabelled (ADE's "other")
    <out>/objectInfo150.txt                                    ADE's class table (Idx, Ratio, Train, Val, Name)
    <out>/coco/instances_{train,val}.json                      COCO instances: boxes + RLE masks, things only
    <out>/lvis/lvis_{train,val}.json                           LVIS v1 style: frequency, neg_category_ids, ...
    <out>/panoptic/panoptic_{train,val}.json + panoptic_{train,val}/*.png   COCO panoptic (things and stuff)

Category ids: the ten Fashion-MNIST classes are things 1..10, ``wall`` and ``floor`` stuff 11 and 12; the ADE-style
PNGs store the category id (so ADE's ``reduce_zero_label`` gives class index = id - 1). Everything is a function of
``(seed, split, index)``: a scene does not depend on how many others are written.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from tasks.common.datasets import FASHION_MNIST_CLASSES, build_dataset

THING_CLASSES = tuple(FASHION_MNIST_CLASSES)
STUFF_CLASSES = ("wall", "floor")
CLASSES = THING_CLASSES + STUFF_CLASSES  # category id = index + 1
WALL_ID, FLOOR_ID = len(THING_CLASSES) + 1, len(THING_CLASSES) + 2
UNLABELLED = 0
SPLITS = {"train": ("train", "training"), "val": ("test", "validation")}  # ours -> (Fashion-MNIST, ADE folder)

# A Cityscapes label id per category, for the Cityscapes-layout copy (write_cityscapes_style): ten train classes
# for the things, building / road for the stuff; unlabelled pixels get id 0, which maps to the ignore index.
CITYSCAPES_IDS = {1: 24, 2: 26, 3: 17, 4: 19, 5: 20, 6: 21, 7: 22, 8: 23, 9: 8, 10: 13, WALL_ID: 11, FLOOR_ID: 7}


@dataclass(frozen=True)
class SceneSpec:
    """How scenes look. Sizes are in pixels or fractions of the (square) canvas."""

    size: int = 96
    items: tuple[int, int] = (2, 5)  # items per scene, inclusive range
    item_size: tuple[float, float] = (0.3, 0.6)  # item side / canvas side
    max_occlusion: float = 0.5  # every earlier item keeps at least this fraction of itself visible
    floor_prob: float = 0.8  # scenes with a floor region below a random horizon; the rest are all wall
    class_weights: tuple[float, ...] | None = None  # thing-class sampling weights (None: uniform), e.g. a long tail
    # Colours (HSV value / saturation ranges). Dark backgrounds and bright items keep the items as Fashion-MNIST shows
    # them (bright on black), so that a backbone trained on Fashion-MNIST transfers in-domain (docs/reference.md §12).
    background_value: tuple[float, float] = (0.0, 0.3)
    item_saturation: tuple[float, float] = (0.0, 0.5)


@dataclass
class Scene:
    """A composed scene: the image, its semantic labels and the visible mask of every thing and stuff region."""

    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8 category ids, 0 = unlabelled
    things: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (category id, visible bool mask (H, W))
    stuff: list[tuple[int, np.ndarray]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ composing


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value)))


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.random((size // cell + 2, size // cell + 2)).astype(np.float32)
    big = Image.fromarray(coarse, mode="F").resize((coarse.shape[1] * cell, coarse.shape[0] * cell), Image.BILINEAR)
    return np.asarray(big)[:size, :size]


def _texture(rng: np.random.Generator, size: int, kind: str, value: tuple[float, float]) -> np.ndarray:
    """A (size, size, 3) float texture in [0, 1] for a background region: walls are smooth, floors patterned."""
    base = _colour(rng, (0.05, 0.6), value)
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "wall":
        pattern = rng.integers(3)
        if pattern == 0:  # plain, with a soft mottling
            shade = 0.15 * (_smooth_noise(rng, size, int(rng.integers(8, 24))) - 0.5)
        elif pattern == 1:  # lit from one side
            shade = rng.uniform(-0.25, 0.25) * (yy / size - 0.5) + rng.uniform(-0.2, 0.2) * (xx / size - 0.5)
        else:  # striped wallpaper
            shade = 0.12 * ((xx // int(rng.integers(3, 10))) % 2) - 0.06
    else:
        pattern = rng.integers(3)
        if pattern == 0:  # tiles
            tile = int(rng.integers(6, 17))
            shade = 0.2 * (((yy // tile) + (xx // tile)) % 2) - 0.1
        elif pattern == 1:  # planks: bands of random brightness
            bands = rng.uniform(-0.15, 0.15, size=size // 4 + 1)
            shade = bands[yy // int(rng.integers(4, 9)) % len(bands)]
        else:  # carpet
            shade = 0.25 * (_smooth_noise(rng, size, 2) - 0.5)
    grain = 0.03 * (rng.random((size, size)) - 0.5)
    # Additive shading: the pattern stays visible on dark backgrounds.
    return np.clip(base[None, None] + (shade + grain)[..., None], 0, 1)


def _fill_small_holes(mask: np.ndarray, max_fraction: float) -> np.ndarray:
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    sizes = ndimage.sum_labels(np.ones_like(mask), holes, index=np.arange(1, count + 1))
    small = np.flatnonzero(sizes <= max_fraction * mask.sum()) + 1
    return mask | np.isin(holes, small)


def _place_items(rng, items, labels, spec: SceneSpec):
    """Choose items, sizes and positions; returns the placed items and the owner map (-1 background).

    An item that finds no position (30 tries) keeping every earlier item visible enough is left out.
    """
    size = spec.size
    owner = np.full((size, size), -1, np.int16)
    placed = []  # (category id, row slice, column slice, hard mask, alpha, rgb), clipped to the canvas
    classes = np.arange(len(THING_CLASSES))
    weights = None if spec.class_weights is None else np.asarray(spec.class_weights, float) / sum(spec.class_weights)
    for _ in range(rng.integers(spec.items[0], spec.items[1] + 1)):
        label = int(rng.choice(classes, p=weights))
        source = items[rng.choice(np.flatnonzero(labels == label))]
        side = int(round(rng.uniform(*spec.item_size) * size))
        gray = np.asarray(Image.fromarray(source).resize((side, side), Image.BILINEAR), np.float32) / 255
        if rng.random() < 0.5:
            gray = gray[:, ::-1]
        # The item's mask is its own pixels: non-zero (> 10% of white), small holes (dark cloth) filled, large ones
        # (a bag's handle) kept open; the anti-aliased rim outside it is blended in and left unlabelled.
        hard = _fill_small_holes(gray > 0.1, max_fraction=0.05)
        if hard.sum() < 16:
            continue
        alpha = np.where(hard, 1.0, np.clip(gray / 0.1, 0, 1))
        rgb = gray[..., None] * _colour(rng, spec.item_saturation, (0.8, 1.0))[None, None]
        for _attempt in range(30):
            y, x = (int(v) for v in rng.integers(-side // 4, size - 3 * side // 4, size=2))
            ys, xs = slice(max(y, 0), min(y + side, size)), slice(max(x, 0), min(x + side, size))
            crop = (slice(ys.start - y, ys.stop - y), slice(xs.start - x, xs.stop - x))
            if hard[crop].sum() < 0.6 * hard.sum():  # mostly inside the canvas
                continue
            trial = owner.copy()
            trial[ys, xs][hard[crop]] = len(placed)
            if all((trial == j).sum() >= (1 - spec.max_occlusion) * p[3].sum() for j, p in enumerate(placed)):
                owner = trial
                placed.append((label + 1, ys, xs, hard[crop], alpha[crop], rgb[crop]))
                break
    return placed, owner


def compose_scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, spec: SceneSpec) -> Scene:
    """One scene from ``items`` (N, 28, 28) uint8 with ``labels`` (N,), drawing everything from ``rng``."""
    size = spec.size
    yy, xx = np.mgrid[0:size, 0:size]
    floor = np.zeros((size, size), bool)
    if rng.random() < spec.floor_prob:
        horizon, slope = rng.uniform(0.3, 0.7) * size, rng.uniform(-0.2, 0.2)
        floor = yy > horizon + slope * (xx - size / 2)
    walls, floors = (_texture(rng, size, kind, spec.background_value) for kind in ("wall", "floor"))
    image = np.where(floor[..., None], floors, walls)

    placed, owner = _place_items(rng, items, labels, spec)
    unlabelled = np.zeros((size, size), bool)
    for _, ys, xs, hard, alpha, rgb in placed:
        region = image[ys, xs]
        image[ys, xs] = region * (1 - alpha[..., None]) + rgb * alpha[..., None]
        rim = (alpha > 0.25) & ~hard  # visibly blended pixels: neither the item nor what is behind it
        unlabelled[ys, xs] &= ~hard
        unlabelled[ys, xs] |= rim

    semantic = np.where(floor, FLOOR_ID, WALL_ID).astype(np.uint8)
    scene = Scene(image=np.round(image * 255).astype(np.uint8), semantic=semantic)
    for index, (category, *_rest) in enumerate(placed):
        visible = (owner == index) & ~unlabelled
        if visible.any():
            semantic[visible] = category
            scene.things.append((category, visible))
    for category, region in ((WALL_ID, ~floor), (FLOOR_ID, floor)):
        visible = region & (owner < 0) & ~unlabelled
        if visible.any():
            scene.stuff.append((category, visible))
    semantic[unlabelled] = UNLABELLED
    return scene


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: scenes are independent of each other and of the count."""
    return np.random.default_rng([seed, list(SPLITS).index(split), index])


# ------------------------------------------------------------------------------------------------ formats


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a mask, in pixels (a one-pixel mask is 1 x 1), as pycocotools' toBbox."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def panoptic_rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours of segment ids: id = R + 256 G + 256^2 B (0 = void)."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def panoptic_ids(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG (H, W, 3): the inverse of :func:`panoptic_rgb`."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _frequency(image_count: int, thresholds: Sequence[int]) -> str:
    # LVIS v1: rare = 1-10 training images, common = 11-100, frequent = more.
    return "r" if image_count <= thresholds[0] else "c" if image_count <= thresholds[1] else "f"


def write_scenes(
    out: str | Path,
    *,
    num_train: int,
    num_val: int,
    seed: int = 0,
    spec: SceneSpec = SceneSpec(),
    fashion_mnist_root: str | None = None,
    lvis_not_exhaustive_prob: float = 0.1,
    lvis_frequency_thresholds: Sequence[int] = (10, 100),
    jpeg_quality: int = 95,
) -> dict:
    """Write ``num_train`` / ``num_val`` scenes to ``out`` in every format (see the module docstring).

    The folder is built under a temporary name next to ``out`` and renamed into place, so a reader never sees a
    half-written dataset and concurrent writers (e.g. several ranks) do not collide: the first one to finish wins.
    Returns a summary (counts per split and class, and the generation settings), also saved as ``scenes.json``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        records = {}
        for split, n in (("train", num_train), ("val", num_val)):
            records[split] = _write_split(tmp, split, n, seed, spec, fashion_mnist_root, jpeg_quality)
        summary = _write_annotations(tmp, records, spec, lvis_not_exhaustive_prob, lvis_frequency_thresholds)
        summary = {"seed": seed, "spec": asdict(spec), "splits": {"train": num_train, "val": num_val}, **summary}
        _write_json(tmp / "scenes.json", summary)
        try:
            os.rename(tmp, out)
        except OSError:  # another writer finished first (or out exists): keep theirs
            if not (out / "scenes.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


@dataclass
class _Record:
    id: int
    name: str
    segments: list[dict]  # {"id", "category_id", "rle", "area", "bbox"}, things first
    rng: np.random.Generator  # the scene's own stream, continued for its LVIS choices
    histogram: np.ndarray  # pixels per category id (0 = unlabelled)


def _write_split(root: Path, split: str, n: int, seed: int, spec: SceneSpec, fmnist_root, quality) -> list[_Record]:
    """Compose and write the images, ADE-style label PNGs and panoptic PNGs of one split."""
    source = build_dataset("fashion_mnist", SPLITS[split][0], root=fmnist_root)
    images_dir, labels_dir = root / "images" / SPLITS[split][1], root / "annotations" / SPLITS[split][1]
    panoptic_dir = root / "panoptic" / f"panoptic_{split}"
    for folder in (images_dir, labels_dir, panoptic_dir):
        folder.mkdir(parents=True)
    records = []
    for index in range(n):
        rng = scene_rng(seed, split, index)
        scene = compose_scene(rng, source.images, source.targets, spec)
        name = f"scene_{index:06d}"
        Image.fromarray(scene.image).save(images_dir / f"{name}.jpg", quality=quality)
        Image.fromarray(scene.semantic).save(labels_dir / f"{name}.png")
        ids = np.zeros(scene.semantic.shape, np.int64)
        segments = []
        for k, (category, mask) in enumerate(scene.things + scene.stuff, start=1):
            segment_id = category * 1000 + k  # unique within the image, the category readable in the thousands
            ids[mask] = segment_id
            # Kept as RLE, box and area, not as masks: a large split would not fit in memory otherwise.
            segments.append({"id": segment_id, "category_id": category, "rle": _rle(mask), "area": int(mask.sum()),
                             "bbox": _box(mask)})  # fmt: skip
        Image.fromarray(panoptic_rgb(ids)).save(panoptic_dir / f"{name}.png")
        histogram = np.bincount(scene.semantic.ravel(), minlength=len(CLASSES) + 1)
        records.append(_Record(index + 1, name, segments, rng, histogram))
    return records


def _instance(ann_id: int, image_id: int, segment: dict) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": segment["category_id"],
        "segmentation": segment["rle"],
        "area": float(segment["area"]),
        "bbox": segment["bbox"],
    }


def _write_annotations(root: Path, records: dict, spec: SceneSpec, not_exhaustive_prob, thresholds) -> dict:
    """COCO instances, LVIS and COCO panoptic JSONs for both splits, and ADE's objectInfo150.txt."""
    things = range(1, len(THING_CLASSES) + 1)
    # Category statistics from the training split, as LVIS reports them (and derives its frequency groups from).
    image_count = {c: sum(any(s["category_id"] == c for s in r.segments) for r in records["train"]) for c in things}
    instance_count = {c: sum(s["category_id"] == c for r in records["train"] for s in r.segments) for c in things}
    thing_categories = [{"id": c, "name": THING_CLASSES[c - 1], "supercategory": "clothing"} for c in things]
    lvis_categories = [
        {
            **cat,
            "synset": cat["name"].lower().replace("/", "_").replace(" ", "_") + ".n.01",
            "synonyms": [cat["name"]],
            "def": f"a Fashion-MNIST {cat['name']}",
            "image_count": image_count[cat["id"]],
            "instance_count": instance_count[cat["id"]],
            "frequency": _frequency(image_count[cat["id"]], thresholds),
        }
        for cat in thing_categories
    ]
    panoptic_categories = [
        {
            "id": i,
            "name": name,
            "supercategory": "clothing" if i in things else "scene",
            "isthing": int(i in things),
            "color": [round(255 * v) for v in colorsys.hsv_to_rgb(i / len(CLASSES), 0.7, 0.9)],
        }
        for i, name in enumerate(CLASSES, start=1)
    ]
    for split, split_records in records.items():
        info = {"description": f"FlexiViT scenes from Fashion-MNIST ({split})", "version": "1.0"}
        images = [
            {"id": r.id, "file_name": f"{r.name}.jpg", "height": spec.size, "width": spec.size} for r in split_records
        ]
        coco, lvis, lvis_images, panoptic = [], [], [], []
        for record, image in zip(split_records, images, strict=True):
            instances = [s for s in record.segments if s["category_id"] in things]
            # LVIS: an instance may be left unannotated ("not exhaustive" for its category in this image), and a
            # random half of the absent categories is listed as verified absent (the negative set).
            dropped = None
            if instances and record.rng.random() < not_exhaustive_prob:
                dropped = int(record.rng.integers(len(instances)))
            absent = [c for c in things if all(s["category_id"] != c for s in instances)]
            negatives = [c for c in absent if record.rng.random() < 0.5]
            for k, segment in enumerate(instances):
                coco.append({**_instance(len(coco) + 1, record.id, segment), "iscrowd": 0})
                if k != dropped:
                    lvis.append(_instance(len(lvis) + 1, record.id, segment))
            lvis_images.append(
                {
                    **image,
                    "neg_category_ids": negatives,
                    "not_exhaustive_category_ids": [] if dropped is None else [instances[dropped]["category_id"]],
                }
            )
            segments_info = [
                {"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "area": s["area"], "bbox": s["bbox"]}
                for s in record.segments
            ]
            panoptic.append({"image_id": record.id, "file_name": f"{record.name}.png", "segments_info": segments_info})
        _write_json(
            root / "coco" / f"instances_{split}.json",
            {"info": info, "images": images, "annotations": coco, "categories": thing_categories},
        )
        _write_json(
            root / "lvis" / f"lvis_{split}.json",
            {"info": info, "images": lvis_images, "annotations": lvis, "categories": lvis_categories},
        )
        _write_json(
            root / "panoptic" / f"panoptic_{split}.json",
            {"info": info, "images": images, "annotations": panoptic, "categories": panoptic_categories},
        )

    # ADE's class table, objectInfo150.txt: Idx, pixel Ratio, images in Train and Val, Name.
    pixels = {split: sum(r.histogram for r in rs) for split, rs in records.items()}
    with_class = {split: sum(r.histogram > 0 for r in rs) for split, rs in records.items()}
    total = max(1, int(pixels["train"].sum()))
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [
        f"{i}\t{pixels['train'][i] / total:.4f}\t{with_class['train'][i]}\t{with_class['val'][i]}\t{name}"
        for i, name in enumerate(CLASSES, start=1)
    ]
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    return {
        "classes": list(CLASSES),
        "things": list(THING_CLASSES),
        "stuff": list(STUFF_CLASSES),
        "train_images_per_thing": {THING_CLASSES[c - 1]: n for c, n in image_count.items()},
        "train_instances_per_thing": {THING_CLASSES[c - 1]: n for c, n in instance_count.items()},
    }


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_cityscapes_style(scenes_root: str | Path, out: str | Path, city: str = "scenes") -> Path:
    """Copy ADE-style scenes into the Cityscapes layout with official label ids (``gtFine_labelIds``).

    ``leftImg8bit/{train,val}/<city>/<city>_000000_<index>_leftImg8bit.png`` and the matching
    ``gtFine/.../*_gtFine_labelIds.png``; categories map to Cityscapes ids by :data:`CITYSCAPES_IDS`, unlabelled pixels
    to id 0 ("unlabeled"). Exercises the Cityscapes reader and its id -> trainId table on local files.
    """
    scenes_root, out = Path(scenes_root), Path(out)
    lut = np.zeros(256, np.uint8)
    for category, label_id in CITYSCAPES_IDS.items():
        lut[category] = label_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for split, (_, folder) in SPLITS.items():
        for k, png in enumerate(sorted((scenes_root / "annotations" / folder).glob("*.png"))):
            stem = f"{city}_000000_{k:06d}"
            for kind in ("leftImg8bit", "gtFine"):
                (tmp / kind / split / city).mkdir(parents=True, exist_ok=True)
            image = Image.open(scenes_root / "images" / folder / f"{png.stem}.jpg").convert("RGB")
            image.save(tmp / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            labels = lut[np.asarray(Image.open(png))]
            Image.fromarray(labels).save(tmp / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            raise
    return out


def ensure_generated(name: str, root: str | Path, generate) -> None:
    """Write generated scenes at ``root`` when it is missing and ``generate`` (scene settings) is given.

    ``ade20k`` / ``folder`` get the ADE-style scenes themselves; ``cityscapes`` a Cityscapes-layout copy of them.
    """
    if not generate or Path(root).exists():
        return
    settings = dict(generate)
    counts = {k: settings.pop(k) for k in ("num_train", "num_val", "seed")}
    spec = SceneSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    scenes = Path(f"{root}.scenes") if name == "cityscapes" else Path(root)
    if not scenes.exists():
        write_scenes(scenes, spec=spec, **counts)
    if name == "cityscapes":
        write_cityscapes_style(scenes, root)
