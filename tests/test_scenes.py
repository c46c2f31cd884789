"""Generated scenes (tasks/common/scenes.py): deterministic, labels consistent across formats, and readable by the
real tools — pycocotools, lvis, the panoptic PNG format (panopticapi when installed) and our segmentation reader.
Perfect detections score AP = 1; predictions with known errors score the mIoU and PQ of their definitions."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from markers import needs_fashion_mnist
from PIL import Image
from scipy import ndimage

from tasks.common import scenes
from tasks.segmentation.data import build_segmentation_dataset
from tasks.segmentation.metrics import confusion_matrix, segmentation_metrics
from tools import make_scenes

pytestmark = needs_fashion_mnist
SPEC = scenes.SceneSpec(size=64)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "scenes"
    # A high not-exhaustive rate so that the LVIS field is exercised on a handful of images.
    scenes.write_scenes(out, num_train=12, num_val=8, seed=3, spec=SPEC, lvis_not_exhaustive_prob=0.5)
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_scenes_are_a_function_of_seed_split_and_index(root):
    items = scenes.build_dataset("fashion_mnist", "test")
    again = scenes.compose_scene(scenes.scene_rng(3, "val", 2), items.images, items.targets, SPEC)
    np.testing.assert_array_equal(
        again.semantic, np.asarray(Image.open(root / "annotations/validation/scene_000002.png"))
    )
    other = scenes.compose_scene(scenes.scene_rng(4, "val", 2), items.images, items.targets, SPEC)
    assert not np.array_equal(again.semantic, other.semantic)


def test_cli_writes_the_same_files_for_the_same_seed(root, tmp_path):
    make_scenes.main(
        ["--out", str(tmp_path / "a"), "--num-train", "2", "--num-val", "1", "--seed", "3", "--size", "64"]
    )
    for name in ("images/training/scene_000001.jpg", "annotations/validation/scene_000000.png",
                 "panoptic/panoptic_train/scene_000001.png"):  # fmt: skip
        assert (tmp_path / "a" / name).read_bytes() == (root / name).read_bytes(), name
    with pytest.raises(SystemExit, match="exists"):
        make_scenes.main(["--out", str(tmp_path / "a"), "--num-train", "1", "--num-val", "1"])


def test_every_pixel_has_one_label_and_items_are_things(root):
    pan = load(root / "panoptic/panoptic_val.json")
    isthing = {c["id"]: c["isthing"] for c in pan["categories"]}
    assert {c["name"] for c in pan["categories"] if not c["isthing"]} == {"wall", "floor"}
    kinds = set()
    for ann in pan["annotations"]:
        ids = scenes.panoptic_ids(np.asarray(Image.open(root / "panoptic/panoptic_val" / ann["file_name"])))
        semantic = np.asarray(Image.open(root / "annotations/validation" / ann["file_name"]))
        segments = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids)) - {0} == set(segments)  # the PNG holds exactly the listed segments
        for sid, s in segments.items():
            assert (ids == sid).sum() == s["area"] and (semantic[ids == sid] == s["category_id"]).all()
            kinds.add(isthing[s["category_id"]])
        np.testing.assert_array_equal(ids == 0, semantic == scenes.UNLABELLED)  # void = unlabelled, nothing else
        assert (ids == 0).mean() < 0.15
    assert kinds == {0, 1}


def test_ade_layout_reads_back_the_generator_labels_reduced_by_one(root):
    dataset = build_segmentation_dataset("ade20k", "validation", root)
    assert dataset.classes == list(scenes.CLASSES) and len(dataset) == 8
    items = scenes.build_dataset("fashion_mnist", "test")
    seen = set()
    for (_, mask_path), (_image, mask) in zip(dataset.pairs, dataset, strict=True):
        stored = np.asarray(Image.open(mask_path)).astype(np.int64)
        np.testing.assert_array_equal(mask, np.where(stored == 0, 255, stored - 1))  # ids reduced by one, 0 -> 255
        # The generator's own record of the scene: each visible region is its category's class (id - 1), the
        # pixels of no region (item rims) are ignored.
        index = int(mask_path.stem.removeprefix("scene_"))
        scene = scenes.compose_scene(scenes.scene_rng(3, "val", index), items.images, items.targets, SPEC)
        expected = np.full(mask.shape, 255)
        for category, region in scene.things + scene.stuff:
            assert (expected[region] == 255).all()  # regions do not overlap
            expected[region] = category - 1
        np.testing.assert_array_equal(mask, expected)
        seen |= set(np.unique(mask).tolist())
    k = len(scenes.CLASSES)
    assert seen <= set(range(k)) | {255} and {k - 2, k - 1, 255} <= seen and seen & set(range(k - 2))


def numpy_iou(preds: list, labels: list, k: int) -> tuple[np.ndarray, float]:
    """Per-class IoU over a set of masks and the pixel accuracy, from the definitions; label 255 is left out."""
    inter, union = np.zeros(k), np.zeros(k)
    correct = labelled = 0
    for p, t in zip(preds, labels, strict=True):
        valid = t != 255
        for c in range(k):
            inter[c] += np.sum((p == c) & (t == c) & valid)
            union[c] += np.sum(((p == c) | (t == c)) & valid)
        correct, labelled = correct + np.sum((p == t) & valid), labelled + valid.sum()
    with np.errstate(invalid="ignore"):
        return inter / union, correct / labelled  # 0 / 0 = NaN: neither labelled nor predicted


def scene_metrics(preds: list, labels: list) -> dict:
    confusion = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), len(scenes.CLASSES))
                    for p, t in zip(preds, labels, strict=True))  # fmt: skip
    return segmentation_metrics(confusion, scenes.CLASSES)


def test_miou_of_perturbed_scene_predictions_matches_the_definition(root):
    labels = [mask for _, mask in build_segmentation_dataset("ade20k", "validation", root)]
    k, rng = len(scenes.CLASSES), np.random.default_rng(0)
    # Shifted by two columns, 10% of pixels replaced by random classes, random classes where the label is ignored.
    preds = []
    for t in labels:
        p = np.roll(np.where(t == 255, rng.integers(0, k, t.shape), t), 2, axis=1)
        preds.append(np.where(rng.random(t.shape) < 0.1, rng.integers(0, k, t.shape), p))
    ours = scene_metrics(preds, labels)
    iou, aacc = numpy_iou(preds, labels, k)
    np.testing.assert_allclose(list(ours["IoU"].values()), iou, rtol=1e-12)
    assert 0.2 < ours["mIoU"] < 0.95 and ours["mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-12)
    assert ours["aAcc"] == pytest.approx(aacc, abs=1e-12)
    # Wall predicted as floor, all else right: wall IoU 0, floor IoU = floor / (floor + wall) pixels.
    wall, floor = scenes.WALL_ID - 1, scenes.FLOOR_ID - 1
    ours = scene_metrics([np.where(t == wall, floor, t) for t in labels], labels)
    n_wall, n_floor = sum((t == wall).sum() for t in labels), sum((t == floor).sum() for t in labels)
    n_valid = sum((t != 255).sum() for t in labels)
    assert ours["IoU"]["wall"] == 0.0 and ours["IoU"]["floor"] == pytest.approx(n_floor / (n_floor + n_wall))
    assert ours["aAcc"] == pytest.approx(1 - n_wall / n_valid)
    present = [c for c in scenes.CLASSES[:-2] if not np.isnan(ours["IoU"][c])]
    assert present and all(ours["IoU"][c] == 1.0 for c in present)


def perfect_detections(coco_json: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in coco_json["annotations"]]  # fmt: skip


def test_coco_instances_load_with_pycocotools_and_perfect_detections_score_ap_1(root):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(root / "coco/instances_val.json"))
    assert len(gt.getImgIds()) == 8 and len(gt.getCatIds()) == 10
    pan = {a["image_id"]: a for a in load(root / "panoptic/panoptic_val.json")["annotations"]}
    for ann in gt.loadAnns(gt.getAnnIds()):
        assert list(mask_utils.toBbox(ann["segmentation"])) == ann["bbox"]
        assert ann["area"] == gt.annToMask(ann).sum() > 0
        assert any(s["bbox"] == ann["bbox"] for s in pan[ann["image_id"]]["segments_info"])
    detections = gt.loadRes(perfect_detections(load(root / "coco/instances_val.json")))
    for iou_type in ("bbox", "segm"):
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0) and evaluator.stats[1] == pytest.approx(1.0), iou_type


def test_lvis_json_loads_with_lvis_and_perfect_detections_score_ap_1(root, monkeypatch):
    from lvis import LVIS, LVISEval, LVISResults

    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 uses np.float, removed in numpy 2
    gt = LVIS(str(root / "lvis/lvis_val.json"))
    categories = gt.load_cats(None)
    assert {c["frequency"] for c in categories} <= {"r", "c", "f"} and all("image_count" in c for c in categories)
    images = gt.load_imgs(gt.get_img_ids())
    assert all({"neg_category_ids", "not_exhaustive_category_ids"} <= set(img) for img in images)
    assert any(img["not_exhaustive_category_ids"] for img in images) and any(img["neg_category_ids"] for img in images)
    for img in images:  # negatives are verified absent, not-exhaustive categories present
        present = {a["category_id"] for a in gt.load_anns(gt.get_ann_ids(img_ids=[img["id"]]))}
        assert not present & set(img["neg_category_ids"])
    # All instances, including those LVIS left unannotated in not-exhaustive images: those detections are ignored.
    coco = load(root / "coco/instances_val.json")
    assert len(coco["annotations"]) > len(gt.get_ann_ids())
    for iou_type in ("bbox", "segm"):
        evaluator = LVISEval(gt, LVISResults(gt, perfect_detections(coco)), iou_type)
        evaluator.run()
        assert evaluator.results["AP"] == pytest.approx(1.0), iou_type


def minimal_pq_stats(gt_json: dict, gt_dir: Path, pred_json: dict, pred_dir: Path) -> dict:
    """PQ's per-category (IoU sum, TP, FP, FN) from the definition (Kirillov et al.): segments match at IoU > 0.5
    within a category, void excluded."""
    stats = defaultdict(lambda: np.zeros(4))
    predictions = {a["image_id"]: a for a in pred_json["annotations"]}
    for gt_ann in gt_json["annotations"]:
        pred_ann = predictions[gt_ann["image_id"]]
        gt_ids = scenes.panoptic_ids(np.asarray(Image.open(gt_dir / gt_ann["file_name"])))
        pred_ids = scenes.panoptic_ids(np.asarray(Image.open(pred_dir / pred_ann["file_name"])))
        gts = {s["id"]: s["category_id"] for s in gt_ann["segments_info"]}
        preds = {s["id"]: s["category_id"] for s in pred_ann["segments_info"]}
        matched_gt, matched_pred = set(), set()
        for g, g_cat in gts.items():
            for p, p_cat in preds.items():
                if g_cat != p_cat:
                    continue
                inter = np.sum((gt_ids == g) & (pred_ids == p))
                union = np.sum(gt_ids == g) + np.sum((pred_ids == p) & (gt_ids != 0)) - inter
                if inter / union > 0.5:
                    stats[g_cat] += [inter / union, 1, 0, 0]
                    matched_gt.add(g)
                    matched_pred.add(p)
        for g, g_cat in gts.items():
            if g not in matched_gt:
                stats[g_cat][3] += 1
        for p, p_cat in preds.items():
            on_void = np.sum((pred_ids == p) & (gt_ids == 0)) / np.sum(pred_ids == p)
            if p not in matched_pred and on_void <= 0.5:
                stats[p_cat][2] += 1
    return dict(stats)


def pq(stats: dict, categories=None) -> float:
    """The mean over categories (all, or those in ``categories``) of IoU sum / (TP + FP / 2 + FN / 2)."""
    return float(np.mean([iou / (tp + fp / 2 + fn / 2) for c, (iou, tp, fp, fn) in stats.items()
                          if categories is None or c in categories]))  # fmt: skip


@pytest.fixture(scope="module")
def degraded(root, tmp_path_factory) -> tuple[dict, Path, dict]:
    """Predictions with known errors, and the per-category (IoU sum, TP, FP, FN) they must score.

    Image 0 misses its first segment (a FN); image 1 leaves the first 30% of its largest segment's pixels void
    (still a TP, IoU = 0.7); image 2 gives its first thing another category (a FN in one category, a FP in another);
    image 3 grows its first thing over the void pixels next to it and predicts a segment made of the remaining void
    pixels, which PQ ignores (IoU still 1, no FP).
    """
    gt_json, gt_dir = load(root / "panoptic/panoptic_val.json"), root / "panoptic/panoptic_val"
    pred_dir = tmp_path_factory.mktemp("pred") / "panoptic_pred"
    shutil.copytree(gt_dir, pred_dir)
    pred_json = json.loads(json.dumps(gt_json))
    expected = defaultdict(lambda: np.zeros(4))
    for ann in gt_json["annotations"]:
        for s in ann["segments_info"]:
            expected[s["category_id"]] += [1, 1, 0, 0]
    missed, partial, relabelled = pred_json["annotations"][:3]
    dropped = missed["segments_info"].pop(0)
    ids = scenes.panoptic_ids(np.asarray(Image.open(pred_dir / missed["file_name"])))
    Image.fromarray(scenes.panoptic_rgb(np.where(ids == dropped["id"], 0, ids))).save(pred_dir / missed["file_name"])
    expected[dropped["category_id"]] += [-1, -1, 0, 1]
    largest = max(partial["segments_info"], key=lambda s: s["area"])
    ids = scenes.panoptic_ids(np.asarray(Image.open(pred_dir / partial["file_name"])))
    cut = int(0.3 * largest["area"])
    ids.ravel()[np.flatnonzero(ids == largest["id"])[:cut]] = 0
    Image.fromarray(scenes.panoptic_rgb(ids)).save(pred_dir / partial["file_name"])
    expected[largest["category_id"]][0] -= cut / largest["area"]
    thing = next(s for s in relabelled["segments_info"] if s["category_id"] <= len(scenes.THING_CLASSES))
    old, thing["category_id"] = thing["category_id"], thing["category_id"] % len(scenes.THING_CLASSES) + 1
    expected[old] += [-1, -1, 0, 1]
    expected[thing["category_id"]] += [0, 0, 1, 0]
    on_void = pred_json["annotations"][3]
    ids = scenes.panoptic_ids(np.asarray(Image.open(pred_dir / on_void["file_name"])))
    grown = on_void["segments_info"][0]
    rim = ndimage.binary_dilation(ids == grown["id"]) & (ids == 0)
    ids[rim] = grown["id"]
    assert rim.any() and (ids == 0).any()
    ids[ids == 0] = 999
    on_void["segments_info"].append({"id": 999, "category_id": 1, "iscrowd": 0})
    Image.fromarray(scenes.panoptic_rgb(ids)).save(pred_dir / on_void["file_name"])
    (pred_dir.parent / "panoptic_pred.json").write_text(json.dumps(pred_json))
    return pred_json, pred_dir, dict(expected)


def assert_same_stats(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for c in want:
        np.testing.assert_allclose(got[c], want[c], rtol=0, atol=1e-12, err_msg=f"category {c}")


def test_panoptic_pq_from_the_definition_scores_known_errors(root, degraded):
    gt_json, gt_dir = load(root / "panoptic/panoptic_val.json"), root / "panoptic/panoptic_val"
    perfect = minimal_pq_stats(gt_json, gt_dir, gt_json, gt_dir)
    assert pq(perfect) == 1.0 and all(iou == tp and fp == fn == 0 for iou, tp, fp, fn in perfect.values())
    pred_json, pred_dir, expected = degraded
    stats = minimal_pq_stats(gt_json, gt_dir, pred_json, pred_dir)
    assert_same_stats(stats, expected)
    assert pq(stats) < 1.0


def test_panoptic_pq_matches_panopticapi(root, degraded):
    evaluation = pytest.importorskip(
        "panopticapi.evaluation", reason="panopticapi not installed (pip install --no-deps panopticapi-lite)"
    )
    gt_path, gt_dir = str(root / "panoptic/panoptic_val.json"), str(root / "panoptic/panoptic_val")
    assert evaluation.pq_compute(gt_path, gt_path, gt_dir, gt_dir)["All"]["pq"] == pytest.approx(1.0, abs=1e-12)
    pred_json, pred_dir, expected = degraded
    result = evaluation.pq_compute(gt_path, str(pred_dir.parent / "panoptic_pred.json"), gt_dir, str(pred_dir))
    categories = {c["id"]: c["isthing"] for c in load(root / "panoptic/panoptic_val.json")["categories"]}
    assert result["All"]["n"] == len(expected)
    for name, subset in (("All", None), ("Things", {c for c, t in categories.items() if t}),
                         ("Stuff", {c for c, t in categories.items() if not t})):  # fmt: skip
        assert result[name]["pq"] == pytest.approx(pq(expected, subset), abs=1e-12), name
    for c, (iou, tp, fp, fn) in expected.items():
        assert result["per_class"][c]["pq"] == pytest.approx(iou / (tp + fp / 2 + fn / 2), abs=1e-12), c
        assert result["per_class"][c]["rq"] == pytest.approx(tp / (tp + fp / 2 + fn / 2), abs=1e-12), c


def test_cityscapes_layout_copy_reads_back_as_train_ids(root, tmp_path):
    out = scenes.write_cityscapes_style(root, tmp_path / "cityscapes")
    dataset = build_segmentation_dataset("cityscapes", "val", out)
    ade = build_segmentation_dataset("ade20k", "validation", root)
    assert len(dataset) == len(ade)
    from tasks.segmentation.data import cityscapes_train_id_table

    table = cityscapes_train_id_table()
    for (_, mask), (_, ade_mask) in zip(dataset, ade, strict=True):
        category = np.where(ade_mask == 255, 0, ade_mask.astype(np.int64) + 1)
        ids = np.array([scenes.CITYSCAPES_IDS.get(c, 0) for c in range(256)], np.uint8)[category]
        np.testing.assert_array_equal(mask, table[ids])


def test_crop_accuracy_counts_thing_boxes_with_their_labels(root):
    # A classifier that always says class c is right exactly on the boxes of category id c + 1; the stuff regions
    # (ids 11, 12) are never counted.
    from tools.scripts.crop_accuracy import crop_accuracy

    anns = load(root / "lvis" / "lvis_val.json")["annotations"]
    things = [a["category_id"] for a in anns if a["category_id"] <= 10]
    seen = []

    def always(c):
        def model(x, patch_size):
            seen.append((tuple(x.shape), float(x.min()), float(x.max())))
            return torch.nn.functional.one_hot(torch.tensor([c]), 10).float()

        return model

    for c in sorted({t - 1 for t in things})[:2]:
        assert crop_accuracy(always(c), root, size=24) == (things.count(c + 1), len(things))
    assert all(shape == (1, 3, 24, 24) and -1 <= lo <= hi <= 1 for shape, lo, hi in seen)
