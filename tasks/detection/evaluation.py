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
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision

LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


# ------------------------------------------------------------------------------------------------ post-processing


def batched_top_k_detections(
    logits: torch.Tensor, boxes: torch.Tensor, k: int = 300, objectness: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores (B, k), classes (B, k), boxes (B, k, 4))``: per image, the ``k`` best (box, class) pairs over all
    classes from ``logits`` (B, N, C) and ``boxes`` (B, N, 4), best first. Scores are sigmoids (times the objectness
    sigmoid when ``objectness`` (B, N) is given, as OWLv2 ranks); no score threshold (OWL-ViT's LVIS protocol).
    ``k`` is capped at N * C."""
    if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(
            f"expected logits (B, N, C) and boxes (B, N, 4), got {tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    scores = logits.float().sigmoid()  # (B, N, C)
    if objectness is not None:
        scores = scores * objectness.float().sigmoid()[..., None]
    num_classes = scores.shape[-1]
    top = scores.flatten(1).topk(min(k, scores[0].numel()), dim=1)  # over the N * C (box, class) pairs
    token = torch.div(top.indices, num_classes, rounding_mode="floor")  # (B, k): flat index = token * C + class
    picked = torch.gather(boxes, 1, token[..., None].expand(-1, -1, 4))
    return top.values, top.indices % num_classes, picked


def top_k_detections(
    logits: torch.Tensor, boxes: torch.Tensor, k: int = 300, objectness: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores (k,), classes (k,), boxes (k, 4))`` of one image from ``logits`` (N, C), ``boxes`` (N, 4) and the
    optional ``objectness`` (N,): :func:`batched_top_k_detections` of a batch of one."""
    scores, classes, picked = batched_top_k_detections(
        logits[None], boxes[None], k, None if objectness is None else objectness[None]
    )
    return scores[0], classes[0], picked[0]


def to_pixel_xywh(boxes: torch.Tensor, padded_size: int, scale: float, orig_size: Sequence[int]) -> torch.Tensor:
    """Normalised cxcywh boxes (K, 4) of the padded ``padded_size`` square -> COCO pixel ``[x, y, w, h]`` (K, 4) of
    the original ``orig_size`` (h, w) image.

    The image was resized by ``scale`` and padded bottom/right, so there is no offset to undo: ``xyxy * S / scale``,
    then clipped to the original image (a box reaching into the padding ends at the image border).
    """
    xyxy = torchvision.ops.box_convert(boxes.float(), "cxcywh", "xyxy") * (padded_size / scale)
    h, w = orig_size
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
    return torchvision.ops.box_convert(xyxy, "xyxy", "xywh")


def classwise_nms(
    boxes_xyxy: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float = 0.5
) -> torch.Tensor:
    """Indices kept by non-maximum suppression within each class, best first: for display only (AP is computed on
    the raw top 300, as OWL-ViT evaluates)."""
    return torchvision.ops.batched_nms(boxes_xyxy.float(), scores.float(), classes, iou)


def _rows(values) -> list:
    """A tensor / array / sequence as plain Python lists (one C-level conversion rather than per-element floats)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    if isinstance(values, np.ndarray):
        return values.tolist()
    return list(values)


class ResultsWriter:
    """Streams results to a JSON list, image by image, durably: a temporary file in the target folder, fsynced and
    renamed over ``path`` only when the block ends without an exception (an earlier results file is left untouched
    and the temporary file removed otherwise). The file's text is exactly ``json.dumps`` of the list of entries.
    Boxes are rounded to 0.01 px and scores to 6 significant digits, far below what AP resolves.

        with ResultsWriter("results.json") as writer:
            writer.add(image_id, category_ids, boxes_xywh, scores)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self._file = None
        self._tmp: str | None = None

    def __enter__(self) -> ResultsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = os.fdopen(fd, "w")
        self._file.write("[")
        return self

    def add(self, image_id: int, category_ids: Sequence[int], boxes_xywh, scores) -> None:
        """Append one image's detections: ``category_ids`` (K,) JSON ids, ``boxes_xywh`` (K, 4) pixels, ``scores``
        (K,); tensors, arrays or lists."""
        if self._file is None:
            raise RuntimeError(f"ResultsWriter({self.path}).add called outside its 'with' block")
        category_ids, boxes_xywh, scores = _rows(category_ids), _rows(boxes_xywh), _rows(scores)
        if not len(category_ids) == len(boxes_xywh) == len(scores):
            raise ValueError(
                f"image {image_id}: {len(category_ids)} category ids, {len(boxes_xywh)} boxes and {len(scores)} scores"
            )
        image_id = int(image_id)
        parts = []
        for category_id, box, score in zip(category_ids, boxes_xywh, scores, strict=True):
            if len(box) != 4:
                raise ValueError(f"image {image_id}: a box must be [x, y, w, h], got {box}")
            entry = {
                "image_id": image_id,
                "category_id": int(category_id),
                "bbox": [round(float(v), 2) for v in box],
                "score": float(f"{float(score):.6g}"),
            }
            parts.append(json.dumps(entry))
        if parts:
            self._file.write((", " if self.count else "") + ", ".join(parts))  # json.dumps's list separator
            self.count += len(parts)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._file.write("]")
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            self._file = None
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


# ------------------------------------------------------------------------------------------------ evaluation


def _load(value) -> dict | list:
    if isinstance(value, str | Path):
        with open(value) as f:
            return json.load(f)
    return value


def _check_results(gt: dict, results: list, source: str) -> None:
    """Every result has the four keys and an image / category id of the ground truth (lvis and pycocotools would
    fail later with a bare KeyError / assertion, or silently drop it)."""
    if not isinstance(results, list):
        raise ValueError(f"results {source}: expected a list of {RESULT_KEYS} dicts, got {type(results).__name__}")
    images = {im["id"] for im in gt["images"]}
    categories = {c["id"] for c in gt["categories"]}
    bad_images, bad_categories = set(), set()
    for i, r in enumerate(results):
        if not isinstance(r, dict) or any(k not in r for k in RESULT_KEYS):
            raise ValueError(f"results {source}: entry {i} must be a dict with keys {RESULT_KEYS}, got {r!r}")
        if r["image_id"] not in images:
            bad_images.add(r["image_id"])
        if r["category_id"] not in categories:
            bad_categories.add(r["category_id"])
    if bad_images or bad_categories:
        raise ValueError(
            f"results {source}: image ids {sorted(bad_images)[:10]} and category ids {sorted(bad_categories)[:10]} "
            "are not in the ground truth"
        )


def _check_lvis_gt(gt: dict, source: str) -> None:
    for key in ("images", "categories", "annotations"):
        if key not in gt:
            raise ValueError(f"LVIS ground truth {source} has no {key!r}")
    for im in gt["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key not in im:
                raise ValueError(f"LVIS ground truth {source}: image {im.get('id')} has no {key!r} (a federated list)")
    for c in gt["categories"]:
        if c.get("frequency") not in ("r", "c", "f"):
            raise ValueError(f"LVIS ground truth {source}: category {c.get('id')} has frequency {c.get('frequency')!r}")


_NUMPY_SHIMMED = False


def _patch_numpy_for_lvis() -> None:
    # lvis 0.5.3 (the release on PyPI) still calls np.float in LVISEval.accumulate, an alias removed in numpy 1.24
    # (docs/reference.md §8). np.float was the builtin float, so restoring the alias changes nothing else.
    global _NUMPY_SHIMMED
    if not _NUMPY_SHIMMED:
        if not hasattr(np, "float"):
            np.float = float  # type: ignore[attr-defined]
        _NUMPY_SHIMMED = True


@contextlib.contextmanager
def _quiet_lvis():
    """lvis logs every stage at INFO and warns that a list of results is "assumed correct" (checked above)."""
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # lvis calls the deprecated Logger.warn
            yield
    finally:
        logger.setLevel(level)


def _lvis_classes():
    """LVIS / LVISEval subclasses: a ground truth from a dict (lvis reads a path only) and an evaluator whose
    per-(image, category) lookups do not insert empty lists into its defaultdicts, nor keep one per empty pair as
    its IoU matrix (the same values: at 20k images x 1203 classes lvis's own lookups grow each dict to 24M entries;
    tools/benchmarks/detection_eval.py measures 1.07 -> 0.55 MiB per image with the polygon note below)."""
    from lvis import LVIS, LVISEval

    class DictLVIS(LVIS):
        def __init__(self, dataset: dict):
            self.logger = logging.getLogger("lvis.lvis")
            self.dataset = dataset
            self._create_index()

    class LeanLVISEval(LVISEval):
        def _get_gt_dt(self, img_id, cat_id):
            if not self.params.use_cats:
                return super()._get_gt_dt(img_id, cat_id)
            return self._gts.get((img_id, cat_id), []), self._dts.get((img_id, cat_id), [])

        def compute_iou(self, img_id, cat_id):
            # lvis returns a fresh [] for each of the 24M empty pairs; the shared () reads the same in evaluate_img.
            if (img_id, cat_id) not in self._gts and (img_id, cat_id) not in self._dts:
                return ()
            return super().compute_iou(img_id, cat_id)

    return DictLVIS, LeanLVISEval


def lvis_evaluate(gt, results, max_dets: int = 300, image_ids: Sequence[int] | None = None) -> dict:
    """LVIS box AP of ``results`` (a results JSON path or list) against ``gt`` (an LVIS JSON path or dict):
    ``{AP, AP50, AP75, APs, APm, APl, APr, APc, APf}`` as fractions; NaN for a group with no category or no ground
    truth (LVISEval's -1); all zeros when there are no results. ``image_ids`` restricts the evaluation to those
    images (an evaluated subset). The result dicts of a list are annotated in place, as lvis does (area, id, an
    empty "segmentation"): no copy of 6M results is made."""
    from lvis import LVISResults

    _patch_numpy_for_lvis()
    source = str(results) if isinstance(results, str | Path) else "list"
    gt_source = str(gt) if isinstance(gt, str | Path) else "dict"
    gt_data, results = _load(gt), _load(results)
    _check_lvis_gt(gt_data, gt_source)
    _check_results(gt_data, results, source)
    if not results:  # LVISResults indexes results[0]
        print(f"lvis_evaluate: no detections in {source}: every AP is 0")
        return dict.fromkeys(LVIS_KEYS, 0.0)
    # LVISResults adds a box polygon to every result without a "segmentation", which 'bbox' evaluation never reads
    # (~230 bytes each, 1.4 GiB at 20k images x 300): one shared empty list instead.
    no_polygon: list = []
    for r in results:
        r.setdefault("segmentation", no_polygon)
    DictLVIS, LeanLVISEval = _lvis_classes()
    with _quiet_lvis():
        lvis_gt = DictLVIS(gt_data)
        # LVISResults deep-copies its template's dataset and replaces the annotations: give it none to copy.
        template = DictLVIS({"images": gt_data["images"], "categories": gt_data["categories"], "annotations": []})
        evaluator = LeanLVISEval(lvis_gt, LVISResults(template, results, max_dets=max_dets), "bbox")
        evaluator.params.max_dets = max_dets
        if image_ids is not None:
            evaluator.params.img_ids = sorted(image_ids)
        evaluator.run()
    values = evaluator.get_results()
    return {k: float("nan") if values[k] == -1 else float(values[k]) for k in LVIS_KEYS}


def coco_evaluate(gt, results, image_ids: Sequence[int] | None = None) -> dict:
    """COCO box AP (pycocotools' COCOeval, maxDets 100) of ``results`` against ``gt`` (paths or loaded JSON):
    ``{AP, AP50, AP75, APs, APm, APl}`` = ``stats[0:6]``; NaN for an area range without ground truth (COCOeval's -1);
    all zeros when there are no results. summarize()'s table is captured, not printed."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    source = str(results) if isinstance(results, str | Path) else "list"
    gt_data, results = _load(gt), _load(results)
    _check_results(gt_data, results, source)
    if not results:  # COCO.loadRes indexes results[0]
        print(f"coco_evaluate: no detections in {source}: every AP is 0")
        return dict.fromkeys(COCO_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()  # pycocotools reads a path only: fill the dataset and index it
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float("nan") if v == -1 else float(v) for k, v in zip(COCO_KEYS, evaluator.stats[:6], strict=True)}
