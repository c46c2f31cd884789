"""PQ / SQ / RQ of panoptic predictions through panopticapi's ``pq_compute`` (docs/reference.md §10).

Predictions are written as COCO panoptic files (:func:`tasks.panoptic.targets.write_coco_panoptic`) and scored by
the reference implementation: segments match at IoU > 0.5 within a category, void pixels are left out of the
union, crowd regions are ignored, and every ground-truth image needs a prediction.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

INSTALL_HINT = "pip install --no-deps panopticapi-lite==0.2.0 (tools/setup.sh does; --no-deps: it pins an old numpy)"
GROUPS = {"All": "", "Things": "_th", "Stuff": "_st"}


def pq_compute(gt_json, pred_json, gt_dir, pred_dir, *, quiet: bool = True) -> dict:
    """panopticapi's result dict (``All`` / ``Things`` / ``Stuff`` with ``pq``, ``sq``, ``rq``, ``n``, and
    ``per_class``) for the prediction files against the ground truth. ``quiet`` hides its per-core progress prints."""
    try:
        from panopticapi.evaluation import pq_compute as reference
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"PQ needs panopticapi: {INSTALL_HINT}") from err
    for path in (gt_json, pred_json, gt_dir, pred_dir):
        if not Path(path).exists():
            raise FileNotFoundError(f"pq_compute: {path} does not exist")
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        return reference(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))


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
