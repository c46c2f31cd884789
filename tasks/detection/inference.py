"""Open-vocabulary detection on a user's images (``TASK.predict``): free-text queries or the model's class names,
boxes in the original image's pixels after a score threshold and class-wise NMS, drawn with their labels.

Preprocessing is evaluation's (tasks/detection/transforms.py ``EvalTransform``: resize the long side to
``data.image_size``, pad bottom/right, the config's value range) and so is the box mapping (``to_pixel_xywh``); what
evaluation does not do, since AP wants the raw top 300, is the threshold and the NMS, which a picture needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as TF

from tasks import Prediction
from tasks.common.transforms import as_value_range

from .evaluation import classwise_nms, to_pixel_xywh, top_k_detections
from .model import prompt_templates
from .transforms import EvalTransform

PREDICT_OPTIONS = ("queries", "score_threshold", "nms_iou", "topk")
# 0.1: a box must stand out from the 0.01 every score starts at (the class head's shift init) by a factor of ten;
# 0.5: the IoU torchvision's detectors suppress at; 100: COCOeval's maxDets.
DEFAULTS = {"score_threshold": 0.1, "nms_iou": 0.5, "topk": 100}
CANDIDATES = 2000  # the best (box, query) pairs that go on to the threshold and the NMS (evaluation keeps 300)
# One colour per query (its index modulo the list): easily told apart, the first ones most of all.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 225, 25), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128), (255, 255, 255),
]  # fmt: skip


def _options(options: dict) -> dict:
    """The user's options over the defaults, checked (a bad value is named, not clamped)."""
    out = {"queries": None, **DEFAULTS, **options}
    queries = out["queries"]
    if isinstance(queries, str):
        queries = [queries]
    if queries is not None:
        queries = [str(q).strip() for q in queries]
        if not queries or not all(queries):
            raise ValueError(f"queries must be non-empty texts, got {out['queries']!r}")
    out["queries"] = queries
    if not 0 <= float(out["score_threshold"]) <= 1:
        raise ValueError(f"score_threshold must be in [0, 1], got {out['score_threshold']}")
    if not 0 < float(out["nms_iou"]) <= 1:
        raise ValueError(f"nms_iou must be in (0, 1] (1: no suppression), got {out['nms_iou']}")
    if int(out["topk"]) != out["topk"] or out["topk"] < 1:
        raise ValueError(f"topk must be a positive integer, got {out['topk']}")
    return out


def select_detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    objectness: torch.Tensor | None,
    *,
    padded_size: int,
    scale: float,
    orig_size: Sequence[int],
    score_threshold: float,
    nms_iou: float,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's ``(xywh (K, 4) pixels of the original image, scores (K,), query indices (K,))``, best first.

    From ``logits`` (N, Q), ``boxes`` (N, 4) normalised cxcywh of the padded square and ``objectness`` (N,) or None:
    the best :data:`CANDIDATES` (box, query) pairs (evaluation's ranking), those scoring at least
    ``score_threshold``, mapped to pixels and clipped to the image (a box wholly in the padding vanishes), class-wise
    NMS at ``nms_iou``, the ``topk`` best.
    """
    scores, classes, picked = top_k_detections(logits, boxes, CANDIDATES, objectness)
    keep = scores >= score_threshold
    scores, classes = scores[keep].float().cpu(), classes[keep].cpu()
    xywh = to_pixel_xywh(picked[keep].cpu(), padded_size, scale, orig_size)
    visible = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    xywh, scores, classes = xywh[visible], scores[visible], classes[visible]
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    kept = classwise_nms(xyxy, scores, classes, nms_iou)[:topk]  # sorted by decreasing score
    return xywh[kept], scores[kept], classes[kept]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def draw_detections(image: Image.Image, detections: Sequence[dict]) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's box outlined in its query's colour and ``"label score"`` on
    a filled tag above the box (inside its top edge when the box touches the image's top). Worst first, so that the
    best box is drawn on top."""
    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    line = max(2, round(max(out.size) / 300))
    font = _font(max(10, round(max(out.size) / 45)))
    for det in reversed(detections):
        colour = PALETTE[det["category_id"] % len(PALETTE)]
        x, y, w, h = det["bbox"]
        x0, y0, x1, y1 = round(x), round(y), max(round(x + w) - 1, round(x)), max(round(y + h) - 1, round(y))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y0 - th if y0 >= th else y0 + line
        ink = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)  # dark text on light tags
        draw.rectangle((x0, ty, x0 + tw - 1, ty + th - 1), fill=colour)
        draw.text((x0 + 2 - left, ty + 2 - top), text, fill=ink, font=font)
    return out


def _summary(detections: Sequence[dict], threshold: float, shown: int = 5) -> str:
    """ "3 boxes: a bag 0.81, a shoe 0.64, a bag 0.12" (the best ``shown``, then "...")."""
    if not detections:
        return f"0 boxes scoring >= {threshold}"
    best = ", ".join(f"{d['label']} {d['score']:.2f}" for d in detections[:shown])
    noun = "box" if len(detections) == 1 else "boxes"
    return f"{len(detections)} {noun}: {best}" + (", ..." if len(detections) > shown else "")


def predict(model, config, info, images: Sequence[Image.Image], patch_size, options: dict) -> list[Prediction]:
    """Open-vocabulary detection on RGB ``images`` at ``patch_size``, one :class:`~tasks.Prediction` each.

    ``options`` (all optional): ``queries`` the texts to detect, used as written (default: the model's class names,
    each the mean of the evaluation templates ``data.eval_templates``, as evaluation queries them);
    ``score_threshold`` (0.1), ``nms_iou`` (0.5), ``topk`` (100). The record is COCO-style:
    ``{"detections": [{"bbox": [x, y, w, h] pixels, "score", "category_id": query index, "label": query}, ...],
    "queries": [...]}``, best first.
    """
    opts = _options(options)
    if opts["queries"]:
        queries, templates = opts["queries"], ["{}"]
    else:
        queries = list(model.query_names or (info or {}).get("classnames") or ())
        templates = prompt_templates(config.data.eval_templates)
        if not queries:
            raise ValueError("the model stores no class names: give the texts to detect (queries)")
    device = next(model.parameters()).device
    size = config.data.image_size
    transform = EvalTransform(size, as_value_range(config.data.value_range))
    predictions = []
    with torch.no_grad():
        embeds = model.embed_prompts(queries, templates, device)  # (Q, E)
        for image in images:
            canvas, target = transform(TF.pil_to_tensor(image.convert("RGB")), {"image_id": 0})
            out = model(canvas[None].to(device), embeds, None, patch_size=patch_size)
            objectness = out["objectness"][0] if "objectness" in out else None
            xywh, scores, classes = select_detections(
                out["logits"][0],
                out["boxes"][0],
                objectness,
                padded_size=size,
                scale=target["scale"],
                orig_size=target["orig_size"],
                score_threshold=float(opts["score_threshold"]),
                nms_iou=float(opts["nms_iou"]),
                topk=int(opts["topk"]),
            )
            detections = [
                {"bbox": [round(v, 2) for v in box], "score": score, "category_id": c, "label": queries[c]}
                for box, score, c in zip(xywh.tolist(), scores.tolist(), classes.tolist(), strict=True)
            ]
            record = {"detections": detections, "queries": list(queries)}
            summary = _summary(detections, opts["score_threshold"])
            predictions.append(Prediction(summary, record, draw_detections(image, detections), overlay=False))
    return predictions
