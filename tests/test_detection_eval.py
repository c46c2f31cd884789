"""Detection evaluation: top-k against brute force, un-padding against EvalTransform, the streamed results file, and
the LVIS / COCO wrappers against lvis.LVISEval / pycocotools.COCOeval run directly on the same predictions."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torchvision

from tasks.detection import evaluation
from tasks.detection.transforms import EvalTransform

pytest.importorskip("lvis", reason="lvis is needed for the LVIS evaluation tests")
pytest.importorskip("pycocotools", reason="pycocotools is needed for the COCO evaluation tests")

# Non-contiguous JSON ids, so a mix-up of class index and category id shows.
CATEGORIES = {3: "r", 5: "c", 8: "f", 11: "f", 14: "c", 20: "r"}
IMAGE_IDS = (7, 9, 12, 15, 21)


def _gt(seed: int = 0) -> dict:
    """An LVIS-style ground truth (also valid COCO): every category has boxes, each image lists a few verified
    negatives and one not-exhaustive positive class."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    cats = list(CATEGORIES)
    for i, image_id in enumerate(IMAGE_IDS):
        positives = [cats[i % 6], cats[(i + 2) % 6], cats[(i + 4) % 6]]
        negatives = [c for c in cats if c not in positives][:2]
        images.append(
            {
                "id": image_id,
                "width": 640,
                "height": 480,
                "neg_category_ids": negatives,
                "not_exhaustive_category_ids": positives[2:],
            }
        )
        for category_id in positives:
            for _ in range(int(rng.integers(1, 3))):
                w, h = rng.uniform(10, 200, size=2)
                x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": [float(x), float(y), float(w), float(h)],
                        "area": float(w * h),
                        "iscrowd": 0,
                    }
                )
    categories = [{"id": c, "name": f"class{c}", "frequency": f} for c, f in CATEGORIES.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _predictions(gt: dict, seed: int = 1, extra: int = 12) -> list[dict]:
    """Jittered copies of the ground-truth boxes (some with a wrong class) plus random boxes of random classes."""
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)
    out = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.15, size=4) * [w, h, w, h]
        category = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(cats))
        box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
        out.append({"image_id": ann["image_id"], "category_id": category, "bbox": box, "score": float(rng.random())})
    for image_id in IMAGE_IDS:
        for _ in range(extra):
            w, h = rng.uniform(5, 300, size=2)
            box = [float(rng.uniform(0, 600)), float(rng.uniform(0, 450)), float(w), float(h)]
            out.append(
                {"image_id": image_id, "category_id": int(rng.choice(cats)), "bbox": box, "score": float(rng.random())}
            )
    return out


def _perfect(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in gt["annotations"]
    ]


def _write(tmp_path, gt: dict):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def _lvis_direct(gt_path, results, max_dets=300, img_ids=None) -> dict:
    from lvis import LVIS, LVISEval, LVISResults

    evaluation._patch_numpy_for_lvis()
    lvis_gt = LVIS(str(gt_path))
    evaluator = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(results), max_dets=max_dets), "bbox")
    if img_ids is not None:
        evaluator.params.img_ids = img_ids
    evaluator.run()
    return evaluator.get_results()


def _assert_same(ours: dict, direct: dict, keys) -> None:
    assert set(ours) == set(keys)
    for key in keys:
        expected = float("nan") if direct[key] == -1 else direct[key]
        np.testing.assert_allclose(ours[key], expected, rtol=0, atol=1e-12, err_msg=key)


# ------------------------------------------------------------------------------------------------ LVIS / COCO


def test_lvis_evaluate_equals_lvis_eval_run_directly(tmp_path):
    gt = _gt()
    path = _write(tmp_path, gt)
    results = _predictions(gt)
    direct = _lvis_direct(path, results)
    assert 0.05 < direct["AP"] < 0.95  # a non-trivial score, so agreement means something
    _assert_same(evaluation.lvis_evaluate(path, copy.deepcopy(results)), direct, evaluation.LVIS_KEYS)
    _assert_same(evaluation.lvis_evaluate(gt, copy.deepcopy(results)), direct, evaluation.LVIS_KEYS)  # from a dict
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    _assert_same(evaluation.lvis_evaluate(path, results_path), direct, evaluation.LVIS_KEYS)  # from a file
    # max_dets keeps each image's best few before the federated filter, as LVISResults does; a subset of images.
    _assert_same(evaluation.lvis_evaluate(gt, copy.deepcopy(results), max_dets=5), _lvis_direct(path, results, 5),
                 evaluation.LVIS_KEYS)  # fmt: skip
    subset = [9, 15]
    _assert_same(
        evaluation.lvis_evaluate(gt, copy.deepcopy(results), image_ids=subset),
        _lvis_direct(path, results, img_ids=subset),
        evaluation.LVIS_KEYS,
    )


def test_coco_evaluate_equals_cocoeval_stats(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _gt()
    path = _write(tmp_path, gt)
    results = _predictions(gt)
    coco = COCO(str(path))
    direct = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
    direct.evaluate(), direct.accumulate(), direct.summarize()
    assert 0.05 < direct.stats[0] < 0.95
    ours = evaluation.coco_evaluate(path, copy.deepcopy(results))
    assert list(ours) == list(evaluation.COCO_KEYS)
    expected = [float("nan") if v == -1 else v for v in direct.stats[:6]]
    np.testing.assert_allclose([ours[k] for k in evaluation.COCO_KEYS], expected, rtol=0, atol=1e-12)


def test_perfect_predictions_score_ap_1(tmp_path, capsys):
    gt = _gt()
    lvis = evaluation.lvis_evaluate(gt, _perfect(gt))
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert lvis[key] == pytest.approx(1.0, abs=1e-12), key
    coco = evaluation.coco_evaluate(gt, _perfect(gt))
    assert coco["AP"] == pytest.approx(1.0, abs=1e-12) and coco["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert "Average Precision" not in capsys.readouterr().out  # summarize()'s table is captured


def test_federated_rule_unverified_class_is_ignored_verified_negative_is_a_false_positive():
    gt = _gt()
    base = _predictions(gt, extra=0)
    ap = evaluation.lvis_evaluate(gt, copy.deepcopy(base))["AP"]
    image = gt["images"][0]
    positives = {a["category_id"] for a in gt["annotations"] if a["image_id"] == image["id"]}
    unverified = next(c for c in CATEGORIES if c not in positives and c not in image["neg_category_ids"])
    negative = image["neg_category_ids"][0]
    detection = {"image_id": image["id"], "bbox": [50.0, 60.0, 120.0, 90.0], "score": 1.0}
    with_unverified = copy.deepcopy(base) + [{**detection, "category_id": unverified}]
    with_negative = copy.deepcopy(base) + [{**detection, "category_id": negative}]
    assert evaluation.lvis_evaluate(gt, with_unverified)["AP"] == ap  # exactly: LVISEval drops it
    assert evaluation.lvis_evaluate(gt, with_negative)["AP"] < ap - 1e-4  # a top-scoring false positive


def test_empty_results_give_zeros(tmp_path, capsys):
    gt = _gt()
    assert evaluation.lvis_evaluate(gt, []) == dict.fromkeys(evaluation.LVIS_KEYS, 0.0)
    assert evaluation.coco_evaluate(gt, []) == dict.fromkeys(evaluation.COCO_KEYS, 0.0)
    with evaluation.ResultsWriter(tmp_path / "empty.json"):
        pass  # an evaluation whose every image had no detection
    assert evaluation.lvis_evaluate(gt, tmp_path / "empty.json")["AP"] == 0.0
    assert "no detections" in capsys.readouterr().out


def test_unknown_ids_and_bad_ground_truth_are_named():
    gt = _gt()
    good = {"image_id": 7, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}
    with pytest.raises(ValueError, match=r"category ids \[99\]"):
        evaluation.lvis_evaluate(gt, [good, {**good, "category_id": 99}])
    with pytest.raises(ValueError, match=r"image ids \[4242\]"):
        evaluation.coco_evaluate(gt, [good, {**good, "image_id": 4242}])
    with pytest.raises(ValueError, match=r"entry 1 .*'score'"):
        evaluation.lvis_evaluate(gt, [good, {k: v for k, v in good.items() if k != "score"}])
    broken = copy.deepcopy(gt)
    del broken["images"][1]["neg_category_ids"]
    with pytest.raises(ValueError, match=r"image 9 has no 'neg_category_ids'"):
        evaluation.lvis_evaluate(broken, [good])


# ------------------------------------------------------------------------------------------------ post-processing


def test_top_k_is_the_brute_force_best_pairs():
    torch.manual_seed(0)
    n, c, k = 9, 6, 20
    logits, boxes, objectness = torch.randn(2, n, c), torch.rand(2, n, 4), torch.randn(2, n)
    for with_objectness in (False, True):
        obj = objectness if with_objectness else None
        scores, classes, picked = evaluation.batched_top_k_detections(logits, boxes, k, obj)
        assert scores.shape == (2, k) and classes.shape == (2, k) and picked.shape == (2, k, 4)
        for b in range(2):
            pairs = []
            for token, cls in itertools.product(range(n), range(c)):
                score = 1 / (1 + math.exp(-logits[b, token, cls].item()))
                if with_objectness:
                    score *= 1 / (1 + math.exp(-objectness[b, token].item()))
                pairs.append((score, token, cls))
            best = sorted(pairs, reverse=True)[:k]
            np.testing.assert_allclose(scores[b].numpy(), [s for s, _, _ in best], rtol=1e-6)
            assert classes[b].tolist() == [cls for _, _, cls in best]
            assert torch.equal(picked[b], boxes[b, [t for _, t, _ in best]])
            single = evaluation.top_k_detections(logits[b], boxes[b], k, None if obj is None else obj[b])
            for x, y in zip(single, (scores[b], classes[b], picked[b]), strict=True):
                assert torch.equal(x, y)
    assert len(evaluation.top_k_detections(logits[0], boxes[0], k=300)[0]) == n * c  # capped at N * C


def test_to_pixel_xywh_undoes_the_eval_transform():
    size, (h, w) = 64, (48, 80)
    _, target = EvalTransform(size)(torch.zeros(3, h, w, dtype=torch.uint8), {"image_id": 1})
    assert target["scale"] == pytest.approx(size / max(h, w)) and target["orig_size"] == (h, w)
    pixels = torch.tensor([[10.0, 5.0, 30.0, 20.0], [0.0, 0.0, 80.0, 48.0], [61.5, 30.25, 12.0, 9.5]])  # xywh
    xyxy = torchvision.ops.box_convert(pixels, "xywh", "xyxy")
    normalised = torchvision.ops.box_convert(xyxy * target["scale"] / size, "xyxy", "cxcywh")
    back = evaluation.to_pixel_xywh(normalised, size, target["scale"], target["orig_size"])
    torch.testing.assert_close(back, pixels, rtol=0, atol=1e-4)
    # A box reaching into the bottom/right padding ends at the image border (h = 48 px = 0.6 of the square).
    into_padding = torch.tensor([[0.5, 0.55, 0.2, 0.3]])  # y from 0.4 to 0.7, x from 0.4 to 0.6 of 64 / 0.8 px
    clipped = evaluation.to_pixel_xywh(into_padding, size, target["scale"], target["orig_size"])
    torch.testing.assert_close(clipped, torch.tensor([[32.0, 32.0, 16.0, 16.0]]), rtol=0, atol=1e-4)


def test_classwise_nms_suppresses_within_a_class_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 1, 0])
    assert evaluation.classwise_nms(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]  # box 1: IoU 0.81 with 0


def _rounded(image_id, category_ids, boxes, scores) -> list[dict]:
    """The documented rounding: boxes to 0.01 px, scores to 6 significant digits."""
    return [
        {
            "image_id": image_id,
            "category_id": c,
            "bbox": [round(v, 2) for v in box],
            "score": float(f"{s:.6g}"),
        }
        for c, box, s in zip(category_ids, boxes.tolist(), scores.tolist(), strict=True)
    ]


def test_results_writer_streams_exactly_the_json_list(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "out" / "results.json"
    expected = []
    with evaluation.ResultsWriter(path) as writer:
        for image_id, k in ((7, 4), (9, 0), (12, 3)):
            boxes, scores = torch.rand(k, 4, dtype=torch.float64) * 600, torch.rand(k, dtype=torch.float64)
            category_ids = torch.randint(1, 30, (k,))
            writer.add(image_id, category_ids, boxes, scores)
            expected += _rounded(image_id, category_ids.tolist(), boxes, scores)
    assert writer.count == 7
    assert path.read_text() == json.dumps(expected)
    assert json.loads(path.read_text()) == expected
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_results_writer_keeps_the_previous_file_on_an_exception(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("[]")
    with pytest.raises(RuntimeError, match="crash"), evaluation.ResultsWriter(path) as writer:
        writer.add(1, [3], [[0.0, 0.0, 5.0, 5.0]], [0.5])
        raise RuntimeError("crash in the middle of an evaluation")
    assert path.read_text() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left
    with (
        pytest.raises(ValueError, match="image 4: 2 category ids, 1 boxes and 2 scores"),
        evaluation.ResultsWriter(path) as writer,
    ):
        writer.add(4, [3, 5], [[0.0, 0.0, 5.0, 5.0]], [0.5, 0.4])
    assert path.read_text() == "[]"
