"""PQ / SQ / RQ of panoptic predictions through panopticapi's ``pq_compute`` (docs/reference.md §10).

Predictions are written as COCO panoptic files (:func:`tasks.panoptic.targets.write_coco_panoptic`) and scored by
the reference implementation: segments match at IoU > 0.5 within a category, void pixels are left out of the
union, crowd regions are ignored, and every annotated ground-truth image needs a prediction (a subset of the images
is scored against a ground truth restricted to it).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

INSTALL_HINT = "pip install --no-deps panopticapi-lite==0.2.0 (tools/setup.sh does; --no-deps: it pins an old numpy)"
GROUPS = {"All": "", "Things": "_th", "Stuff": "_st"}


def pq_compute(gt_json, pred_json, gt_dir, pred_dir, *, image_ids=None, quiet: bool = True) -> dict:
    """panopticapi's result dict (``All`` / ``Things`` / ``Stuff`` with ``pq``, ``sq``, ``rq``, ``n``, and
    ``per_class``) for the prediction files against the ground truth. ``quiet`` hides its per-core progress prints.

    ``image_ids`` scores these images of the ground truth only (a validation subset, ``data.val_examples``):
    panopticapi scores every annotation of its ground-truth JSON and needs a prediction for each, so it is given a
    copy restricted to them (:func:`subset_ground_truth`), which gives the PQ of those images alone.
    """
    try:
        from panopticapi.evaluation import pq_compute as reference
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"PQ needs panopticapi: {INSTALL_HINT}") from err
    for path in (gt_json, pred_json, gt_dir, pred_dir):
        if not Path(path).exists():
            raise FileNotFoundError(f"pq_compute: {path} does not exist")
    with tempfile.TemporaryDirectory(prefix="flexivit-pq-") as tmp:
        if image_ids is not None:
            gt_json = subset_ground_truth(gt_json, image_ids, Path(tmp) / Path(gt_json).name)
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return reference(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))


def subset_ground_truth(gt_json, image_ids, out_json) -> Path:
    """Write the ground truth of ``image_ids`` alone (their images and annotations, every category) to ``out_json``;
    an id without an annotation in ``gt_json`` is an error naming it."""
    gt = json.loads(Path(gt_json).read_text())
    keep = set(image_ids)
    annotations = [annotation for annotation in gt["annotations"] if annotation["image_id"] in keep]
    missing = keep - {annotation["image_id"] for annotation in annotations}
    if missing:
        raise ValueError(f"{gt_json} has no annotation of image id(s) {sorted(missing)[:8]} ({len(missing)} in all)")
    images = [image for image in gt["images"] if image["id"] in keep]
    Path(out_json).write_text(json.dumps({**gt, "images": images, "annotations": annotations}))
    return Path(out_json)


def panoptic_metrics(result: dict) -> dict:
    """Flatten a ``pq_compute`` result to ``PQ``, ``SQ``, ``RQ`` and their ``_th`` / ``_st`` versions, in percent
    (the convention of the UViM and COCO tables); a group without categories (no stuff, say) is left out."""
    out = {}
    for group, suffix in GROUPS.items():
        if result[group]["n"] == 0:
            continue
        for key in ("pq", "sq", "rq"):
            out[key.upper() + suffix] = 100.0 * float(result[group][key])
    return out
