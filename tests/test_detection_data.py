"""Detection data: COCO / LVIS / labelme readers, validation, rare classes, query sets, transforms, collation."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from tasks.common.loader import JointTransform, SeededItems
from tasks.detection.data import (
    LABELME_COCO_ROOT,
    box_iou_xywh,
    clean_coco_json,
    mark_rare,
    read_coco,
    read_labelme_coco,
    read_lvis,
    read_scenes,
    remove_classes,
)
from tasks.detection.queries import frequency_weights, sample_queries
from tasks.detection.transforms import (
    EvalTransform,
    TrainTransform,
    collate,
    collate_eval,
    crop,
    crop_flip_resize,
)

# ------------------------------------------------------------------------------------------------ helpers


def _image(path: Path, h: int, w: int, rect=None, value: int = 0) -> Path:
    """A black (or ``value``) RGB image with an optional white rectangle ``rect`` = (x0, y0, x1, y1)."""
    array = np.full((h, w, 3), value, np.uint8)
    if rect is not None:
        x0, y0, x1, y1 = rect
        array[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _coco_data() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 64},
            {"id": 2, "file_name": "sub/b.jpg", "height": 30, "width": 20},
        ],
        # Deliberately out of id order: classes must come sorted by id.
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 5, "name": "five"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [50, 10, 30, 20], "iscrowd": 0},  # clipped to 64
            {"id": 12, "image_id": 2, "category_id": 5, "bbox": [0, 0, 5, 5]},
        ],
    }


@pytest.fixture
def coco(tmp_path):
    _image(tmp_path / "a.png", 40, 64)
    _image(tmp_path / "sub" / "b.jpg", 30, 20)
    return _write(tmp_path / "instances.json", _coco_data()), tmp_path


def _lvis_data() -> dict:
    cats = [
        {"id": 1, "name": "mug", "frequency": "f", "image_count": 400},
        {"id": 2, "name": "cup", "frequency": "c", "image_count": 50},
        {"id": 4, "name": "kettle", "frequency": "r", "image_count": 3},
    ]
    images = [
        # LVIS v1 names images by coco_url; the split folder is used when it exists under the image root.
        {"id": 1, "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg", "height": 200, "width": 200,
         "neg_category_ids": [4], "not_exhaustive_category_ids": [2]},
        {"id": 2, "coco_url": "http://images.cocodataset.org/train2017/000000000002.jpg", "height": 200,
         "width": 200, "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]  # fmt: skip
    anns = [
        # image 1: IoU([0,0,100,100], [0,0,100,90]) = 9000 / 10000 = 0.9 -> one instance "mug" + "cup"
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 90]},
        {"id": 3, "image_id": 1, "category_id": 4, "bbox": [120, 120, 50, 50]},
        # image 2: IoU = 8500 / 10000 = 0.85 -> two instances
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 100, 100]},
        {"id": 5, "image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 85]},
    ]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture
def lvis(tmp_path):
    (tmp_path / "val2017").mkdir()
    _image(tmp_path / "val2017" / "000000000001.jpg", 200, 200)
    _image(tmp_path / "000000000002.jpg", 200, 200)  # no train2017 folder: the bare name under the root
    return _write(tmp_path / "lvis.json", _lvis_data()), tmp_path


# ------------------------------------------------------------------------------------------------ readers


def test_coco_reader_values(coco):
    path, root = coco
    ds = read_coco(path, root)
    assert ds.classes == ["three", "five", "seven"] and ds.category_ids == [3, 5, 7]
    assert ds.frequency is None and ds.exhaustive and ds.json_path == path and len(ds) == 2
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 64)
    assert target["image_id"] == 1 and target["orig_size"] == (40, 64)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].canvas_size == (40, 64)
    # xywh -> xyxy; the second box runs past the right edge (50 + 30 > 64) and is clipped.
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[1.0, 2, 11, 22], [50, 10, 64, 30]])
    )
    assert target["labels"].tolist() == [[False, False, True], [True, False, False]]  # seven -> 2, three -> 0
    assert not target["negatives"].any() and not target["not_exhaustive"].any()
    assert ds[1][1]["labels"].tolist() == [[False, True, False]]
    assert ds.image_count.tolist() == [1, 1, 1]


def test_lvis_reader_merges_at_iou_09_but_not_085(lvis):
    path, root = lvis
    ds = read_lvis(path, root)
    assert ds.classes == ["mug", "cup", "kettle"] and ds.frequency == ["f", "c", "r"] and not ds.exhaustive
    assert ds.image_count.tolist() == [400, 50, 3]  # the JSON's counts, not the file's
    assert ds.records[0].path == root / "val2017" / "000000000001.jpg"
    assert ds.records[1].path == root / "000000000002.jpg"
    _, t1 = ds[0]
    assert t1["labels"].tolist() == [[True, True, False], [False, False, True]]
    torch.testing.assert_close(
        t1["boxes"].as_subclass(torch.Tensor), torch.tensor([[0.0, 0, 100, 100], [120, 120, 170, 170]])
    )
    assert t1["negatives"].tolist() == [False, False, True] and t1["not_exhaustive"].tolist() == [False, True, False]
    _, t2 = ds[1]
    assert t2["labels"].tolist() == [[True, False, False], [False, True, False]]
    assert len(read_lvis(path, root, merge_iou=None).records[0].classes) == 3


def test_box_iou_matches_torchvision():
    from torchvision.ops import box_iou

    rng = np.random.default_rng(0)
    a = np.concatenate([rng.uniform(0, 50, (7, 2)), rng.uniform(1, 30, (7, 2))], 1)
    b = np.concatenate([rng.uniform(0, 50, (5, 2)), rng.uniform(1, 30, (5, 2))], 1)
    xyxy = lambda x: torch.as_tensor(np.concatenate([x[:, :2], x[:, :2] + x[:, 2:]], 1))
    np.testing.assert_allclose(box_iou_xywh(a, b), box_iou(xyxy(a), xyxy(b)).numpy(), rtol=1e-9)


def _drop(key):
    return lambda d: d.pop(key)


def _edit_ann(index, **changes):
    def edit(d):
        d["annotations"][index].update(changes)

    return edit


def _del_ann_key(index, key):
    return lambda d: d["annotations"][index].pop(key)


BAD_COCO = {
    "no images": (_drop("images"), r"no 'images' list"),
    "no annotations": (_drop("annotations"), r"no 'annotations' list"),
    "no categories": (_drop("categories"), r"no 'categories' list"),
    "no bbox": (_del_ann_key(1, "bbox"), r"annotation id 11 has no 'bbox'"),
    "no image_id": (_del_ann_key(1, "image_id"), r"annotation id 11 has no 'image_id'"),
    "no category_id": (_del_ann_key(1, "category_id"), r"annotation id 11 has no 'category_id'"),
    "no annotation id": (_del_ann_key(1, "id"), r"an annotation has no 'id'"),
    "no image id": (lambda d: d["images"][1].pop("id"), r"an image has no 'id'"),
    "no height": (lambda d: d["images"][1].pop("height"), r"image id 2 has no 'height'"),
    "no file": (lambda d: d["images"][1].pop("file_name"), r"image id 2 has neither 'file_name' nor 'coco_url'"),
    "unknown category": (_edit_ann(1, category_id=99), r"annotation id 11 has unknown category id 99"),
    "unknown image": (_edit_ann(1, image_id=42), r"annotation id 11 refers to image id 42"),
    "duplicate annotation": (_edit_ann(1, id=10), r"duplicate annotation id 10"),
    "duplicate image": (lambda d: d["images"][1].update(id=1), r"duplicate image id 1"),
    "duplicate category": (lambda d: d["categories"][1].update(id=7), r"duplicate category id 7"),
    "short bbox": (_edit_ann(1, bbox=[1, 2, 3]), r"annotation id 11 has bbox \[1, 2, 3\]"),
    "nan bbox": (_edit_ann(1, bbox=[1, 2, float("nan"), 3]), r"annotation id 11 has a non-finite bbox"),
}


@pytest.mark.parametrize("case", list(BAD_COCO))
def test_bad_coco_input_names_file_and_id(tmp_path, case):
    edit, message = BAD_COCO[case]
    data = _coco_data()
    edit(data)
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        read_coco(path, tmp_path)


BAD_LVIS = {
    "no neg ids": (lambda d: d["images"][0].pop("neg_category_ids"), r"image id 1 has no 'neg_category_ids'"),
    "no not-exhaustive ids": (
        lambda d: d["images"][1].pop("not_exhaustive_category_ids"),
        r"image id 2 has no 'not_exhaustive_category_ids'",
    ),
    "unknown neg id": (lambda d: d["images"][0].update(neg_category_ids=[3]), r"image id 1 has unknown category id 3"),
    "no frequency": (lambda d: d["categories"][2].pop("frequency"), r"category id 4 has no 'frequency'"),
    "bad frequency": (lambda d: d["categories"][2].update(frequency="x"), r"category id 4 has frequency 'x'"),
}


@pytest.mark.parametrize("case", list(BAD_LVIS))
def test_bad_lvis_input_names_file_and_id(tmp_path, case):
    edit, message = BAD_LVIS[case]
    data = _lvis_data()
    edit(data)
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        read_lvis(path, tmp_path)


def test_degenerate_and_crowd_annotations_are_skipped_with_a_count(tmp_path, capsys):
    data = _coco_data()
    data["annotations"] += [
        {"id": 20, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},  # zero width
        {"id": 21, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, -2]},  # negative height
        {"id": 22, "image_id": 1, "category_id": 3, "bbox": [70, 5, 10, 10]},  # right of the 64-wide image
        {"id": 23, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 1},
    ]
    path = _write(tmp_path / "instances.json", data)
    ds = read_coco(path, tmp_path)
    out = capsys.readouterr().out
    assert f"skipped 4 annotations of {path}" in out
    assert "2 zero-area" in out and "1 outside the image" in out and "1 crowd" in out
    assert [len(r.classes) for r in ds.records] == [2, 1]


def test_undecodable_or_wrongly_sized_image_is_named(coco):
    path, root = coco
    (root / "a.png").write_bytes(b"not an image")
    (root / "sub" / "b.jpg").unlink()
    _image(root / "sub" / "b.jpg", 31, 20)
    ds = read_coco(path, root)
    with pytest.raises(ValueError, match=re.escape(str(root / "a.png")) + r" \(image id 1\)"):
        ds[0]
    with pytest.raises(ValueError, match=r"b\.jpg \(image id 2\) is 31x20 .* says 30x20"):
        ds[1]


@pytest.mark.skipif(not LABELME_COCO_ROOT.is_dir(), reason="Debian package labelme-examples not installed")
def test_labelme_coco_example_loads_and_evaluates_perfectly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    raw = json.loads((LABELME_COCO_ROOT / "annotations.json").read_text())
    ds = read_labelme_coco()
    assert len(ds) == 3 and "_background_" not in ds.classes and ds.category_ids == list(range(1, 21))
    assert ds.classes[0] == "aeroplane" and ds.classes[14] == "person"
    for record in ds.records:
        anns = [a for a in raw["annotations"] if a["image_id"] == record.image_id]
        np.testing.assert_allclose(record.boxes, [a["bbox"] for a in anns])  # all inside their images
        assert [c for (c,) in record.classes] == [a["category_id"] - 1 for a in anns]
    image, target = ds[0]
    assert image.shape == (3, *target["orig_size"])

    # The cleaned ground truth scores AP 1 against itself in COCOeval; the raw file does not (annotation id 0
    # is read as "unmatched", so its true positive counts as a false one).
    def self_ap(gt_path):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(gt_path))
            dets = [{**a, "score": 1.0} for a in gt.dataset["annotations"] if a["category_id"] != 0]
            e = COCOeval(
                gt, gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets]), "bbox"
            )
            e.evaluate(), e.accumulate(), e.summarize()
        return e.stats[0]

    clean = clean_coco_json(LABELME_COCO_ROOT / "annotations.json", tmp_path / "gt.json")
    ids = [a["id"] for a in json.loads(clean.read_text())["annotations"]]
    assert min(ids) == 1 and len(set(ids)) == len(ids)
    assert self_ap(clean) == pytest.approx(1.0)
    assert self_ap(LABELME_COCO_ROOT / "annotations.json") < 0.99


# ------------------------------------------------------------------------------------------------ rare classes


def test_remove_classes(lvis):
    path, root = lvis
    ds = read_lvis(path, root)
    kept = remove_classes(ds, ["mug"])
    assert kept.classes == ds.classes and kept.excluded == {0} and ds.excluded == frozenset()
    _, t1 = kept[0]
    assert t1["labels"].tolist() == [[False, True, False], [False, False, True]]  # merged mug+cup -> cup
    _, t2 = kept[1]
    assert t2["labels"].tolist() == [[False, True, False]]  # the mug-only instance is gone
    torch.testing.assert_close(t2["boxes"].as_subclass(torch.Tensor), torch.tensor([[0.0, 0, 100, 85]]))
    assert frequency_weights(kept)[0] == 0 and frequency_weights(kept)[1] == pytest.approx(50**0.5)
    no_kettle = remove_classes(ds, ["kettle"])
    assert not no_kettle[0][1]["negatives"].any()  # kettle was image 1's verified negative
    with pytest.raises(KeyError, match="teapot"):
        remove_classes(ds, ["teapot"])
    # The strict split drops every image that shows a removed class (both images show a mug), keeps the rest whole.
    assert len(remove_classes(ds, ["mug"], drop_images=True)) == 0
    strict = remove_classes(ds, ["kettle"], drop_images=True)
    assert [r.image_id for r in strict.records] == [2] and strict.excluded == {2}  # the kettle was in image 1
    assert strict.records[0].classes == ds.records[1].classes
    # The train transform takes the exclusion from the dataset: mug never becomes a query, even as a negative.
    tf = TrainTransform(32, dataset=kept, num_queries=3, class_weights=torch.ones(3), crop_area=None, mosaic_probs=None)
    for seed in range(5):
        torch.manual_seed(seed)
        _, _, _, queries, valid = tf(*kept[1])
        assert 0 not in queries[valid].tolist() and valid.sum() == 2


def test_mark_rare_is_read_back_by_lvis(lvis, tmp_path):
    lvis_api = pytest.importorskip("lvis")
    path, _ = lvis
    out = mark_rare(path, tmp_path / "out" / "gt.json", ["cup"])
    gt = lvis_api.LVIS(str(out))
    # kettle had 3 images (rare in LVIS terms) but is not named: common; cup is named: rare; mug: frequent.
    assert {c["name"]: c["frequency"] for c in gt.cats.values()} == {"mug": "f", "cup": "r", "kettle": "c"}
    assert [p.name for p in out.parent.iterdir()] == ["gt.json"]  # no temporary file left behind
    with pytest.raises(KeyError, match="teapot"):
        mark_rare(path, tmp_path / "x.json", ["teapot"])


# ------------------------------------------------------------------------------------------------ query sets


def test_sample_queries_keeps_positives_and_negatives_and_never_excluded():
    weights = torch.ones(20)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        q, valid = sample_queries([3, 5, 5], [7, 3], 8, weights, excluded=[0, 1, 2], generator=g)
        assert q.shape == (8,) and q.dtype == torch.int64 and valid.all()
        chosen = q.tolist()
        assert {3, 5, 7} <= set(chosen) and not {0, 1, 2} & set(chosen) and len(set(chosen)) == 8
    # Fewer candidates than Q: padding (-1, invalid) after the valid slots.
    q, valid = sample_queries([1], [2], 6, torch.tensor([1.0, 1, 1, 0]), excluded=[0])
    assert sorted(q[valid].tolist()) == [1, 2] and valid.tolist() == [True, True] + [False] * 4
    assert q[~valid].tolist() == [-1] * 4  # class 3 has weight 0, class 0 is excluded
    # An excluded positive is dropped too.
    q, valid = sample_queries([0, 1], [], 4, torch.ones(4), excluded=[0])
    assert 0 not in q[valid].tolist() and 1 in q.tolist()


def test_sample_queries_respects_q_when_positives_and_negatives_overflow():
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="exceed num_queries"):
        q, valid = sample_queries([0, 1, 2], list(range(3, 10)), 5, torch.ones(10), generator=g)
    assert valid.all() and {0, 1, 2} <= set(q.tolist()) and set(q.tolist()) <= set(range(10))
    q, valid = sample_queries(list(range(10)), [], 4, torch.ones(10), generator=g)
    assert valid.all() and len(set(q.tolist())) == 4


def test_sample_queries_weights_matter():
    weights = torch.tensor([8.0, 1, 1, 0, 2])  # class 3 never
    counts = torch.zeros(5)
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        q, valid = sample_queries([], [], 1, weights, generator=g)
        counts[q[0]] += 1
    np.testing.assert_allclose((counts / counts.sum()).numpy(), (weights / weights.sum()).numpy(), atol=0.03)
    assert counts[3] == 0


def test_sample_queries_shuffles_slots_and_is_reproducible():
    positions = set()
    for seed in range(30):
        q, _ = sample_queries([4], [], 5, torch.ones(10), generator=torch.Generator().manual_seed(seed))
        positions.add(q.tolist().index(4))
    assert positions == set(range(5))
    a = sample_queries([4], [1], 5, torch.ones(10), generator=torch.Generator().manual_seed(3))
    b = sample_queries([4], [1], 5, torch.ones(10), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    q, valid = sample_queries([2], [], 10, torch.ones(6))  # COCO: Q >= C, every class is in
    assert sorted(q[valid].tolist()) == list(range(6))


# ------------------------------------------------------------------------------------------------ transforms


def _boxes(xyxy, hw):
    return tv_tensors.BoundingBoxes(torch.tensor(xyxy, dtype=torch.float32), format="XYXY", canvas_size=hw)


def test_crop_drops_box_keeping_50_and_keeps_box_keeping_70_percent():
    image = torch.zeros(3, 300, 300, dtype=torch.uint8)
    boxes = _boxes([[0, 0, 100, 100], [200, 0, 300, 100]], (300, 300))
    window = (0, 30, 300, 220)  # x in [30, 250): box 0 keeps 70 %, box 1 keeps 50 %
    out, kept, keep, fraction = crop(image, boxes, window, min_box_fraction=0.6)
    assert out.shape == (3, 300, 220) and keep.tolist() == [True, False]
    torch.testing.assert_close(fraction, torch.tensor([0.7, 0.5]))
    torch.testing.assert_close(kept.as_subclass(torch.Tensor), torch.tensor([[0.0, 0, 70, 100]]))
    _, _, keep, partial = crop_flip_resize(image, boxes, 64, window=window)
    assert keep.tolist() == [True, False] and partial.tolist() == [False, True]


def test_train_transform_leaves_partly_cropped_classes_out_of_the_query_set(monkeypatch):
    from torchvision.transforms import v2

    monkeypatch.setattr(v2.RandomResizedCrop, "get_params", staticmethod(lambda *a, **k: (0, 30, 300, 220)))
    image = torch.zeros(3, 300, 300, dtype=torch.uint8)
    target = {
        "image_id": 1,
        "boxes": _boxes([[0, 0, 100, 100], [200, 0, 300, 100]], (300, 300)),
        "labels": torch.tensor([[True, False, False, False], [False, True, False, False]]),
        "negatives": torch.zeros(4, dtype=torch.bool),
    }
    tf = TrainTransform(64, num_queries=4, class_weights=torch.ones(4), hflip=False, mosaic_probs=None)
    _, boxes, labels, queries, valid = tf(image, target)
    assert sorted(queries[valid].tolist()) == [0, 2, 3]  # class 1's box is 50 % visible: neither pos nor neg
    assert boxes.shape == (1, 4) and labels[0].tolist() == (queries == 0).float().tolist()
    # crop is 300 x 220 -> scale 64 / 300; box [0, 0, 70, 100] -> cxcywh / 64
    s = 64 / 300
    torch.testing.assert_close(boxes[0], torch.tensor([35 * s, 50 * s, 70 * s, 100 * s]) / 64, atol=2e-3, rtol=0)


def _rect_target(h, w, rect, num_classes=3, label=0):
    labels = torch.zeros(1, num_classes, dtype=torch.bool)
    labels[0, label] = True
    return {"image_id": 1, "boxes": _boxes([rect], (h, w)), "labels": labels,
            "negatives": torch.zeros(num_classes, dtype=torch.bool)}  # fmt: skip


def _white_extent(image: torch.Tensor, threshold: float) -> list[int]:
    """[x0, y0, x1, y1] of the pixels above ``threshold`` (all channels)."""
    ys, xs = torch.nonzero((image > threshold).all(0), as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_flip_and_resize_with_pad_against_hand_computation():
    # 40 x 80 (h x w) image, white where its box is; S = 64 -> scale 0.8, resized to 32 x 64, padding below.
    rect = (10, 5, 30, 25)
    array = np.zeros((40, 80, 3), np.uint8)
    array[5:25, 10:30] = 255
    image = torch.as_tensor(array).permute(2, 0, 1).contiguous()
    plain = torch.tensor([8.0, 4, 24, 20])  # rect * 0.8
    flipped = torch.tensor([(80 - 30) * 0.8, 4, (80 - 10) * 0.8, 20])
    tf = TrainTransform(64, num_queries=3, class_weights=torch.ones(3), crop_area=None, mosaic_probs=None,
                        value_range=(0.0, 1.0))  # fmt: skip
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, boxes, labels, queries, valid = tf(image, _rect_target(40, 80, rect))
        cx, cy, bw, bh = (boxes[0] * 64).tolist()
        xyxy = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        is_flipped = bool(torch.allclose(xyxy, flipped, atol=1e-4))
        assert is_flipped or torch.allclose(xyxy, plain, atol=1e-4), xyxy
        seen.add(is_flipped)
        # the white pixels moved with the box
        assert _white_extent(out, 0.5) == [round(v) for v in xyxy.tolist()]
        # pad: bottom rows 32..63 hold 0.5; the image rows above it are black or white
        assert torch.all(out[:, 32:] == 0.5) and not torch.any(out[:, :32] == 0.5)
        assert labels.shape == (1, 3) and labels[0].tolist() == (queries == 0).float().tolist()
    assert seen == {True, False}


def test_pad_value_and_location_in_value_range():
    tall = torch.full((3, 80, 40), 255, dtype=torch.uint8)  # h > w: padding on the right
    tf = TrainTransform(64, num_queries=2, class_weights=torch.ones(2), crop_area=None, hflip=False,
                        mosaic_probs=None, value_range=(-1.0, 1.0))  # fmt: skip
    target = {"image_id": 1, "boxes": _boxes(torch.zeros(0, 4), (80, 40)),
              "labels": torch.zeros(0, 2, dtype=torch.bool), "negatives": torch.zeros(2, dtype=torch.bool)}  # fmt: skip
    out, boxes, labels, _, _ = tf(tall, target)
    assert torch.all(out[:, :, 32:] == 0.0) and torch.all(out[:, :, :32] == 1.0)  # grey 0.5 -> 0 in [-1, 1]
    assert boxes.shape == (0, 4) and labels.shape == (0, 2)
    ev, _ = EvalTransform(64, value_range=(-1.0, 1.0))(tall, {"image_id": 1})
    assert torch.all(ev[:, :, 32:] == -1.0) and torch.all(ev[:, :, :32] == 1.0)  # black 0 -> -1


def test_mosaic_2x2_boxes_land_in_their_quadrants(tmp_path):
    rect = (10, 5, 30, 25)
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": 40, "width": 80} for i in range(4)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": i + 1, "bbox": [10, 5, 20, 20]} for i in range(4)]
    cats = [{"id": i + 1, "name": f"c{i}"} for i in range(4)]
    for i in range(4):
        _image(tmp_path / f"{i}.png", 40, 80, rect)
    ds = read_coco(_write(tmp_path / "m.json", {"images": images, "annotations": anns, "categories": cats}), tmp_path)
    tf = TrainTransform(64, dataset=ds, num_queries=4, class_weights=torch.ones(4), crop_area=None, hflip=False,
                        mosaic_probs=(0.0, 1.0), value_range=(0.0, 1.0))  # fmt: skip
    # cell 32: scale 32 / 80 = 0.4, rect -> [4, 2, 12, 10], shifted by (col, row) * 32
    quadrant = {(c, r): [4 + 32 * c, 2 + 32 * r, 12 + 32 * c, 10 + 32 * r] for r in range(2) for c in range(2)}
    for seed in range(3):
        torch.manual_seed(seed)
        out, boxes, labels, queries, valid = tf(*ds[2])
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1) * 64
        assert len(xyxy) == 4
        torch.testing.assert_close(xyxy, torch.tensor(list(quadrant.values()), dtype=torch.float32), atol=1e-4, rtol=0)
        for (c, r), box in quadrant.items():  # each cell shows its white rectangle, its padding is grey
            cell = out[:, 32 * r : 32 * r + 32, 32 * c : 32 * c + 32]
            assert _white_extent(cell, 0.75) == [b - 32 * k for b, k in zip(box, (c, r, c, r), strict=True)]
            assert torch.all(cell[:, 16:] == 0.5)
        # the top-left cell is the item itself (image 3, class 2)
        assert queries[labels[0].bool()].tolist() == [2]


def test_mosaic_3x3_has_nine_cells(tmp_path, coco):
    path, root = coco
    ds = read_coco(path, root)
    tf = TrainTransform(63, dataset=ds, num_queries=3, class_weights=torch.ones(3), crop_area=None,
                        mosaic_probs=(0.0, 0.0, 1.0))  # fmt: skip
    torch.manual_seed(0)
    out, boxes, _, _, _ = tf(*ds[1])  # image 2 has one box: 9 cells of 1 or 2 boxes
    assert out.shape == (3, 63, 63) and 9 <= len(boxes) <= 18


def test_same_seed_same_item_other_seed_other_item(coco):
    path, root = coco
    ds = read_coco(path, root)
    tf = TrainTransform(48, dataset=ds, num_queries=2, class_weights=torch.ones(3))
    items = SeededItems(ds, JointTransform(tf))
    a, b, c = items[(0, 123)], items[(0, 123)], items[(0, 124)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_collate_shapes_and_padding():
    item = lambda m: (
        torch.rand(3, 8, 8),
        torch.rand(m, 4),
        torch.ones(m, 5),
        torch.arange(5),
        torch.ones(5, dtype=torch.bool),
    )
    a, b = item(2), item(0)
    images, boxes, box_valid, labels, queries, query_valid = collate([a, b])
    assert images.shape == (2, 3, 8, 8) and boxes.shape == (2, 2, 4) and labels.shape == (2, 2, 5)
    assert box_valid.tolist() == [[True, True], [False, False]]
    assert torch.equal(boxes[0], a[1]) and not boxes[1].any() and not labels[1].any()
    assert queries.shape == (2, 5) and queries.dtype == torch.int64 and query_valid.dtype == torch.bool
    assert collate([b, b])[1].shape == (2, 1, 4)  # at least one (invalid) row
    with pytest.raises(ValueError, match="query counts"):
        collate([a, (*b[:3], torch.arange(4), torch.ones(4, dtype=torch.bool))])


def test_eval_transform_scale_maps_boxes_back_to_pixels():
    # 200 x 300 (h x w), white rectangle x 50..150, y 100..150; S = 60 -> scale 0.2
    array = np.zeros((200, 300, 3), np.uint8)
    array[100:150, 50:150] = 255
    image = torch.as_tensor(array).permute(2, 0, 1).contiguous()
    tf = EvalTransform(60, value_range=(0.0, 1.0))
    out, target = tf(image, {"image_id": 17, "boxes": None})
    assert out.shape == (3, 60, 60) and target == {"image_id": 17, "scale": 0.2, "orig_size": (200, 300)}
    assert torch.all(out[:, 40:] == 0.0)  # padding below the 40 image rows
    normalised = torch.tensor(_white_extent(out, 0.5), dtype=torch.float32) / 60
    back = normalised * 60 / target["scale"]  # the convention of the evaluation: xyxy_normalised * S / scale
    torch.testing.assert_close(back, torch.tensor([50.0, 100, 150, 150]))
    images, targets = collate_eval([(out, target), (out, target)])
    assert images.shape == (2, 3, 60, 60) and targets == [target, target]


# ------------------------------------------------------------------------------------------------ real scenes


def test_scenes_read_as_coco_and_lvis(tmp_path):
    from tasks.common.datasets import FASHION_MNIST_ROOT
    from tasks.common.scenes import THING_CLASSES, SceneSpec, write_scenes

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    root = tmp_path / "scenes"
    write_scenes(root, spec=SceneSpec(size=48, items=(1, 3)), num_train=4, num_val=2, seed=0)
    coco = read_scenes(root, "train", "coco")
    lvis = read_scenes(root, "train", "lvis")
    val = read_scenes(root, "val", "lvis")
    assert coco.classes == lvis.classes == list(THING_CLASSES) and len(coco) == len(lvis) == 4 and len(val) == 2
    raw = json.loads((root / "coco" / "instances_train.json").read_text())
    for record in coco.records:
        expected = [a["bbox"] for a in raw["annotations"] if a["image_id"] == record.image_id]
        np.testing.assert_allclose(record.boxes, np.asarray(expected).reshape(-1, 4))
    lvis_raw = json.loads((root / "lvis" / "lvis_train.json").read_text())
    for record, image in zip(lvis.records, lvis_raw["images"], strict=True):
        assert [lvis.category_ids[c] for c in record.negatives] == sorted(image["neg_category_ids"])
    image, target = lvis[0]
    assert image.shape == (3, 48, 48) and target["labels"].shape[1] == 10
    tf = TrainTransform(32, dataset=lvis, num_queries=6, class_weights=frequency_weights(lvis))
    batch = collate([SeededItems(lvis, JointTransform(tf))[(i, i)] for i in range(4)])
    assert batch[0].shape == (4, 3, 32, 32) and batch[4].shape == (4, 6)
