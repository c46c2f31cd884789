"""From predictions to AP: top-300 detections per image, results streamed to JSON, LVISEval / COCOeval wrappers.

The protocol is OWL-ViT's (docs/reference.md §8): the top 300 (box, class) pairs of an image over all classes, no
score threshold, boxes un-padded to pixel ``[x, y, w, h]``; LVIS AP / APr / APc / APf through the ``lvis`` package,
COCO AP through pycocotools. At LVIS v1 val's size (20k images x 1203 classes) an image's logits are 300x larger
than its results, so results are written image by image (:class:`ResultsWriter`) and never held all at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision

LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def top_k_detections(
    logits: torch.Tensor, boxes: torch.Tensor, k: int = 300, objectness: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores (k,), classes (k,), boxes (k, 4))``: the ``k`` best (box, class) pairs of one image over all
    classes, from ``logits`` (N, C) and ``boxes`` (N, 4); scores are sigmoids (times the objectness sigmoid when
    given, as OWLv2 ranks). ``k`` is capped at N * C."""
    scores = logits.float().sigmoid()
    if objectness is not None:
        scores = scores * objectness.float().sigmoid()[:, None]
    top = scores.flatten().topk(min(k, scores.numel()))
    num_classes = scores.shape[1]
    return top.values, top.indices % num_classes, boxes[top.indices // num_classes]


def to_pixel_xywh(boxes: torch.Tensor, padded_size: int, scale: float, orig_size: Sequence[int]) -> torch.Tensor:
    """Normalised cxcywh boxes of the padded square -> COCO pixel ``[x, y, w, h]`` of the original image.

    The image was resized by ``scale`` and padded bottom/right (no offset to undo), then clipped to it.
    """
    xyxy = torchvision.ops.box_convert(boxes.float(), "cxcywh", "xyxy") * (padded_size / scale)
    h, w = orig_size
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
    return torchvision.ops.box_convert(xyxy, "xyxy", "xywh")


class ResultsWriter:
    """Streams results to a JSON list, image by image, durably: a temporary file in the target folder, fsynced and
    renamed over ``path`` only when the block ends without an exception (an earlier results file is never left
    half-written). Boxes are rounded to 0.01 px and scores to 6 significant digits, far below what AP resolves.

        with ResultsWriter("results.json") as writer:
            writer.add(image_id, category_ids, boxes_xywh, scores)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self._file = None

    def __enter__(self) -> ResultsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = os.fdopen(fd, "w")
        self._file.write("[")
        return self

    def add(self, image_id: int, category_ids: Sequence[int], boxes: Sequence, scores: Sequence[float]) -> None:
        if not len(category_ids) == len(boxes) == len(scores):
            raise ValueError(
                f"image {image_id}: {len(category_ids)} category ids, {len(boxes)} boxes and {len(scores)} scores"
            )
        for category_id, box, score in zip(category_ids, boxes, scores, strict=True):
            entry = {
                "image_id": int(image_id),
                "category_id": int(category_id),
                "bbox": [round(float(v), 2) for v in box],
                "score": float(f"{float(score):.6g}"),
            }
            self._file.write(("," if self.count else "") + "\n" + json.dumps(entry))
            self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._file.write("\n]\n")
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


def _load(value) -> dict | list:
    if isinstance(value, str | Path):
        with open(value) as f:
            return json.load(f)
    return value


def _check_ids(gt: dict, results: list, source: str) -> None:
    images = {im["id"] for im in gt["images"]}
    categories = {c["id"] for c in gt["categories"]}
    bad_images = sorted({r["image_id"] for r in results} - images)
    bad_categories = sorted({r["category_id"] for r in results} - categories)
    if bad_images or bad_categories:
        raise ValueError(
            f"results {source}: image ids {bad_images[:10]} and category ids {bad_categories[:10]} are not in the "
            "ground truth"
        )


def _patch_numpy_for_lvis() -> None:
    # lvis 0.5.3 (the release on PyPI) still calls np.float, removed in numpy 1.24 (docs/reference.md §8).
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]


def lvis_evaluate(gt, results, max_dets: int = 300, image_ids: Sequence[int] | None = None) -> dict:
    """LVIS box AP of ``results`` (a results JSON path or list) against ``gt`` (an LVIS JSON path or dict):
    ``{AP, AP50, AP75, APs, APm, APl, APr, APc, APf}`` as fractions; NaN for a frequency group with no category
    (LVISEval's -1). ``image_ids`` restricts the evaluation to those images (an evaluated subset)."""
    from lvis import LVIS, LVISEval, LVISResults

    _patch_numpy_for_lvis()
    source = str(results) if isinstance(results, str | Path) else "list"
    gt_data, results = _load(gt), _load(results)
    _check_ids(gt_data, results, source)
    if not results:
        print(f"lvis_evaluate: no detections in {source}: every AP is 0")
        return dict.fromkeys(LVIS_KEYS, 0.0)

    class _LVIS(LVIS):  # lvis reads its ground truth from a path only
        def __init__(self, dataset: dict):
            self.logger = logging.getLogger("lvis.lvis")
            self.dataset = dataset
            self._create_index()

    # lvis logs every stage (and warns that a list of results is "assumed correct": _check_ids checked it).
    quiet = logging.getLogger("lvis")
    level, quiet.level = quiet.level, logging.ERROR
    with contextlib.redirect_stdout(io.StringIO()), contextlib.ExitStack() as stack:
        stack.callback(setattr, quiet, "level", level)
        lvis_gt = _LVIS(gt_data)
        evaluator = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=max_dets), "bbox")
        if image_ids is not None:
            evaluator.params.img_ids = sorted(image_ids)
        evaluator.run()
    return {k: float("nan") if v == -1 else float(v) for k, v in evaluator.get_results().items() if k in LVIS_KEYS}


def coco_evaluate(gt, results, image_ids: Sequence[int] | None = None) -> dict:
    """COCO box AP (pycocotools' COCOeval) of ``results`` against ``gt``: ``{AP, AP50, AP75, APs, APm, APl}``;
    NaN for an area range without ground truth (COCOeval's -1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    source = str(results) if isinstance(results, str | Path) else "list"
    gt_data, results = _load(gt), _load(results)
    _check_ids(gt_data, results, source)
    if not results:
        print(f"coco_evaluate: no detections in {source}: every AP is 0")
        return dict.fromkeys(COCO_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float("nan") if v == -1 else float(v) for k, v in zip(COCO_KEYS, evaluator.stats[:6], strict=True)}


def classwise_nms(
    boxes_xyxy: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float = 0.5
) -> torch.Tensor:
    """Indices kept by non-maximum suppression within each class, best first: for display only (AP is computed on
    the raw top 300, as OWL-ViT evaluates)."""
    return torchvision.ops.batched_nms(boxes_xyxy.float(), scores.float(), classes, iou)
