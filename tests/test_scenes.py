"""Generated scenes (tasks/common/scenes.py): deterministic, labels consistent across formats, and readable by the
real tools — pycocotools, lvis, the panoptic PNG format (panopticapi when installed) and our segmentation reader —
with perfect predictions scoring AP = 1, PQ = 1 and mIoU = 1."""

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


def test_ade_layout_reads_back_and_perfect_predictions_score_miou_1(root):
    dataset = build_segmentation_dataset("ade20k", "validation", root)
    assert dataset.classes == list(scenes.CLASSES) and len(dataset) == 8
    confusion = 0
    for _image, mask in dataset:
        assert mask.max() < len(scenes.CLASSES) or 255 in mask  # ids reduced by one, 0 -> 255
        mask = torch.from_numpy(mask)
        confusion = confusion + confusion_matrix(mask.clone(), mask, len(scenes.CLASSES))
    metrics = segmentation_metrics(confusion)
    assert metrics["mIoU"] == metrics["aAcc"] == 1.0


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


def minimal_pq(gt_json: dict, gt_dir: Path, pred_json: dict, pred_dir: Path) -> float:
    """PQ (Kirillov et al.) from the definition: segments match at IoU > 0.5 within a category, void excluded."""
    stats = defaultdict(lambda: np.zeros(4))  # per category: IoU sum, TP, FP, FN
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
    return float(np.mean([s[0] / (s[1] + 0.5 * s[2] + 0.5 * s[3]) for s in stats.values()]))


def test_panoptic_perfect_predictions_score_pq_1(root, tmp_path):
    gt_json, gt_dir = load(root / "panoptic/panoptic_val.json"), root / "panoptic/panoptic_val"
    assert minimal_pq(gt_json, gt_dir, gt_json, gt_dir) == pytest.approx(1.0)
    # Drop one segment from the predictions: PQ must fall.
    pred_dir = tmp_path / "pred"
    shutil.copytree(gt_dir, pred_dir)
    pred_json = json.loads(json.dumps(gt_json))
    ann = pred_json["annotations"][0]
    dropped = ann["segments_info"].pop(0)
    ids = scenes.panoptic_ids(np.asarray(Image.open(pred_dir / ann["file_name"])))
    Image.fromarray(scenes.panoptic_rgb(np.where(ids == dropped["id"], 0, ids))).save(pred_dir / ann["file_name"])
    degraded = minimal_pq(gt_json, gt_dir, pred_json, pred_dir)
    assert degraded < 1.0
    try:
        from panopticapi.evaluation import pq_compute
    except ImportError:
        return  # optional (pip install --no-deps panopticapi-lite); the minimal PQ above stands in for it
    gt_path = str(root / "panoptic/panoptic_val.json")
    assert pq_compute(gt_path, gt_path, str(gt_dir), str(gt_dir))["All"]["pq"] == pytest.approx(1.0)
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    result = pq_compute(gt_path, str(tmp_path / "pred.json"), str(gt_dir), str(pred_dir))
    assert result["All"]["pq"] == pytest.approx(degraded, abs=1e-9)


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
