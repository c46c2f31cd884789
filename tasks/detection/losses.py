"""OWL-ViT's detection loss (docs/reference.md §8): Hungarian matching, sigmoid focal loss, L1 + GIoU box losses.

Shapes follow docs/det_spec conventions: one prediction per image token (N), a fixed number of query slots per
image (Q, ``query_valid`` marks the real ones), padded targets (M, ``box_valid`` marks the real ones) whose labels are
multi-hot over the image's query slots. Boxes are normalised (cx, cy, w, h).

LVIS federated training: only the image's query set is scored, so a query slot outside it (``query_valid`` False)
contributes exactly nothing, neither to the matching cost nor to the loss, and receives no gradient.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss

from tasks.common import distributed

DEFAULT_WEIGHTS = {"class": 1.0, "l1": 1.0, "giou": 1.0}  # OWL-ViT's matching and loss weights (all 1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre / size -> corners (x0, y0, x1, y1); as ``torchvision.ops.box_convert(.., "cxcywh", "xyxy")``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> centre / size; the inverse of :func:`cxcywh_to_xyxy`."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.3, gamma: float = 2.0
) -> torch.Tensor:
    """Elementwise focal loss (Lin et al. 2017) on sigmoid probabilities, no reduction.

    ``alpha`` weights positives (``1 - alpha`` negatives; a negative ``alpha`` disables the weighting, as in
    torchvision). OWL-ViT uses alpha 0.3, gamma 2.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def _cost(
    x: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor, tgt: torch.Tensor, alpha: float, gamma: float, w: dict
) -> torch.Tensor:
    """The matching cost from float64 logits x (..., N, Q), labels (..., M, Q), boxes (..., N, 4) / (..., M, 4)."""
    p = torch.sigmoid(x)
    # -log p = softplus(-x) and -log(1 - p) = softplus(x): stable for large |x|.
    pos = alpha * (1 - p) ** gamma * F.softplus(-x)
    neg = (1 - alpha) * p**gamma * F.softplus(x)
    cost_class = (pos - neg) @ labels.transpose(-1, -2)  # (..., N, M): summed over each target's positive labels
    cost_l1 = torch.cdist(pred, tgt, p=1)  # (..., N, M), on cxcywh as DETR / OWL-ViT do
    giou = _pairwise_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(tgt))
    return w["class"] * cost_class + w["l1"] * cost_l1 - w["giou"] * giou


def _pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU (..., N, M) of xyxy boxes a (..., N, 4) and b (..., M, 4): torchvision's ``generalized_box_iou``, the
    same operations in the same order, with leading batch dimensions."""
    a, b = a[..., :, None, :], b[..., None, :, :]  # (..., N, 1, 4), (..., 1, M, 4)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    area = hull[..., 0] * hull[..., 1]
    return inter / union - (area - union) / area


def matching_cost(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    tgt_boxes: torch.Tensor,
    tgt_labels: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    alpha: float = 0.3,
    gamma: float = 2.0,
    weights: dict | None = None,
) -> torch.Tensor:
    """The (N, M) Hungarian cost of assigning prediction i to target j, in float64 on the CPU, without gradients:
    :func:`batch_matching_cost` of a batch of one.

    cost = w_class * class + w_l1 * L1(cxcywh, summed over the 4 coordinates) - w_giou * GIoU(xyxy). The class cost
    is DETR's / OWL-ViT's focal-style one: for each query label q that target j has (and that is a valid query),
    ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with ``p = sigmoid(logits[i, q])``, summed over q.
    """
    one = (t[None] for t in (logits, pred_boxes, tgt_boxes, tgt_labels, query_valid))
    return batch_matching_cost(*one, alpha=alpha, gamma=gamma, weights=weights)[0].cpu()


def batch_matching_cost(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    tgt_boxes: torch.Tensor,
    tgt_labels: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    alpha: float = 0.3,
    gamma: float = 2.0,
    weights: dict | None = None,
) -> torch.Tensor:
    """:func:`matching_cost` of a whole batch at once, on ``logits``' device: (B, N, M) float64, without gradients.

    logits (B, N, Q), pred_boxes (B, N, 4), tgt_boxes (B, M, 4) padded, tgt_labels (B, M, Q), query_valid (B, Q).
    An invalid query slot adds exactly 0 to the class cost (masked, whatever its logit), so column j of image b
    holds that image's cost of target j. Padding target rows get a cost too: the caller leaves them out.
    """
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    with torch.no_grad():
        valid = query_valid.bool()[:, None, :]  # (B, 1, Q)
        x = logits.detach().double().masked_fill(~valid, 0.0)  # finite in masked slots, whatever the logit
        labels = tgt_labels.detach().double().masked_fill(~valid, 0.0)  # (B, M, Q): masked slots weigh 0
        return _cost(x, labels, pred_boxes.detach().double(), tgt_boxes.detach().double(), alpha, gamma, w)


def match(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    tgt_boxes: torch.Tensor,
    tgt_labels: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    alpha: float = 0.3,
    gamma: float = 2.0,
    weights: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian matching of one image: ``(pred_idx, tgt_idx)`` int64 on ``logits``' device, min(N, M) pairs.

    logits (N, Q), pred_boxes (N, 4) and tgt_boxes (M, 4) cxcywh, tgt_labels (M, Q) multi-hot, query_valid (Q,)
    bool. The assignment minimises :func:`matching_cost` (scipy ``linear_sum_assignment``). No targets: empty.
    :func:`match_batch` of a batch of one, every target valid.
    """
    box_valid = torch.ones(1, tgt_boxes.shape[0], dtype=torch.bool, device=logits.device)
    one = (t[None] for t in (logits, pred_boxes, tgt_boxes))
    _, rows, cols = match_batch(
        *one, box_valid, tgt_labels[None], query_valid[None], alpha=alpha, gamma=gamma, weights=weights
    )
    return rows, cols


def match_batch(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    tgt_boxes: torch.Tensor,
    box_valid: torch.Tensor,
    tgt_labels: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    alpha: float = 0.3,
    gamma: float = 2.0,
    weights: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hungarian matching of a batch: ``(batch_idx, pred_idx, tgt_idx)`` int64 on ``logits``' device, image by image
    the assignment that minimises the cost of that image's valid targets (``tgt_idx`` indexes the padded M rows).

    logits (B, N, Q), pred_boxes (B, N, 4), tgt_boxes (B, M, 4), box_valid (B, M), tgt_labels (B, M, Q),
    query_valid (B, Q). The costs of all images are computed on the device (:func:`batch_matching_cost`) and
    copied to the host once, with ``box_valid`` in the same copy: one host synchronisation per batch, not one
    per image; the assignments come back in one copy too.
    """
    device, (B, N, _) = logits.device, logits.shape
    cost = batch_matching_cost(
        logits, pred_boxes, tgt_boxes, tgt_labels, query_valid, alpha=alpha, gamma=gamma, weights=weights
    )
    # One copy: the costs (B, N, M) with box_valid as an extra row (B, 1, M).
    host = torch.cat([cost, box_valid[:, None, :].to(cost.dtype)], dim=1).cpu().numpy()
    parts = []
    for b in range(B):
        valid = np.flatnonzero(host[b, N])
        if not len(valid):
            continue
        image_cost = host[b, :N][:, valid]  # (N, M_b)
        if not np.isfinite(image_cost).all():
            raise ValueError(
                "the matching cost has non-finite entries: predicted or target boxes contain NaN / inf, or a target "
                f"box has zero area (image {b}: targets {tgt_boxes[b, torch.as_tensor(valid)].tolist()})"
            )
        rows, cols = linear_sum_assignment(image_cost)
        parts.append(np.stack([np.full(len(rows), b), rows, valid[cols]]))
    pairs = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0))
    index = torch.as_tensor(pairs.astype(np.int64))
    if device.type == "cuda":
        index = index.pin_memory()
    index = index.to(device, non_blocking=True)
    return index[0], index[1], index[2]


def detection_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    box_valid: torch.Tensor,
    target_labels: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    alpha: float = 0.3,
    gamma: float = 2.0,
    weights: dict | None = None,
    match_weights: dict | None = None,
    normalizer: str = "global",
    objectness: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """OWL-ViT's loss of a batch: ``(loss, {"class", "l1", "giou"})`` (terms unweighted and detached), float32.

    Args:
        logits: (B, N, Q) class logits; boxes: (B, N, 4) predicted cxcywh.
        target_boxes: (B, M, 4) cxcywh, padded; box_valid: (B, M) bool, False on padding rows.
        target_labels: (B, M, Q) multi-hot over the image's query slots; query_valid: (B, Q) bool.
        alpha, gamma: the focal loss's (0.3, 2 in OWL-ViT).
        weights: loss weights {"class", "l1", "giou"} (default all 1); match_weights: the matching cost's (default
            ``weights``).
        normalizer: ``"per_image"``: each image's class sum over its number of positive labels and its box sums over
            its number of boxes (each at least 1), then the mean over the batch (scenic). ``"global"``: the batch's sums
            over the positive-label (box) count of the whole global batch, all-reduced over data-parallel ranks and
            divided by the world size, at least 1 (DETR): DDP's gradient averaging then gives the global mean.
        objectness: (B, N) logits of OWLv2's objectness head, or None. Its target is 1 for the predictions matched
            to a box and 0 for the rest (a sigmoid focal loss normalised like the class loss; term "objectness").

    Every (prediction, valid query) pair gets a focal term; a prediction's targets are its matched target's labels
    (all zero when unmatched). Box losses on matched pairs: L1 on xyxy corners (summed over 4) and 1 - GIoU.
    """
    if normalizer not in ("global", "per_image"):
        raise ValueError(f"normalizer must be 'global' or 'per_image', got {normalizer!r}")
    _check_shapes(logits, boxes, target_boxes, box_valid, target_labels, query_valid)
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    logits, boxes = logits.float(), boxes.float()
    target_boxes, target_labels = target_boxes.float(), target_labels.float()
    query_valid, box_valid = query_valid.bool(), box_valid.bool()
    B, N, Q = logits.shape

    # ---- matching: the costs of every image on the device, one copy to the host, scipy per image
    batch_idx, pred_idx, tgt_idx = match_batch(
        logits,
        boxes,
        target_boxes,
        box_valid,
        target_labels,
        query_valid,
        alpha=alpha,
        gamma=gamma,
        weights=match_weights if match_weights is not None else weights,
    )

    # ---- class loss: focal over every (prediction, valid query) pair; unmatched predictions are pure negatives
    targets = torch.zeros_like(logits)
    targets[batch_idx, pred_idx] = target_labels[batch_idx, tgt_idx]
    valid_pairs = query_valid[:, None, :].expand(B, N, Q)
    # torch.where, not a multiplication: an invalid query slot (logit -1e6, or anything) adds exactly 0 and gets a
    # zero gradient, whatever its value.
    focal = torch.where(valid_pairs, sigmoid_focal_loss(logits, targets, alpha, gamma), 0.0)
    class_sum = focal.sum(dim=(1, 2))  # (B,)
    num_pos = (target_labels * (box_valid[:, :, None] & query_valid[:, None, :])).sum(dim=(1, 2))  # (B,)

    # ---- box losses on matched pairs (indexing keeps the graph even when nothing matched, for DDP)
    src = boxes[batch_idx, pred_idx]  # (K, 4)
    tgt = target_boxes[batch_idx, tgt_idx]
    src_xyxy, tgt_xyxy = cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)
    l1 = (src_xyxy - tgt_xyxy).abs().sum(-1)  # (K,): on corners, unlike the matching cost (docs/reference.md §8)
    giou = generalized_box_iou_loss(src_xyxy, tgt_xyxy, reduction="none")  # (K,) = 1 - GIoU
    l1_sum = logits.new_zeros(B).index_add(0, batch_idx, l1)
    giou_sum = logits.new_zeros(B).index_add(0, batch_idx, giou)
    num_boxes = box_valid.sum(1).float()  # (B,)

    if normalizer == "per_image":
        class_loss = (class_sum / num_pos.clamp(min=1)).mean()
        l1_loss = (l1_sum / num_boxes.clamp(min=1)).mean()
        giou_loss = (giou_sum / num_boxes.clamp(min=1)).mean()
    else:
        counts = torch.stack([num_pos.sum(), num_boxes.sum()]).detach()
        counts = (distributed.all_reduce_sum(counts) / distributed.world_size()).clamp(min=1)
        class_loss = class_sum.sum() / counts[0]
        l1_loss = l1_sum.sum() / counts[1]
        giou_loss = giou_sum.sum() / counts[1]

    loss = w["class"] * class_loss + w["l1"] * l1_loss + w["giou"] * giou_loss
    terms = {"class": class_loss.detach(), "l1": l1_loss.detach(), "giou": giou_loss.detach()}
    if objectness is not None:
        objectness = objectness.float()
        matched = torch.zeros_like(objectness)
        matched[batch_idx, pred_idx] = 1.0
        per_image = sigmoid_focal_loss(objectness, matched, alpha, gamma).sum(1)  # (B,)
        if normalizer == "per_image":
            objectness_loss = (per_image / num_boxes.clamp(min=1)).mean()
        else:
            objectness_loss = per_image.sum() / counts[1]
        loss = loss + w.get("objectness", 1.0) * objectness_loss
        terms["objectness"] = objectness_loss.detach()
    return loss, terms


def _check_shapes(logits, boxes, target_boxes, box_valid, target_labels, query_valid) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, N, Q), got shape {tuple(logits.shape)}")
    B, N, Q = logits.shape
    M = target_boxes.shape[1] if target_boxes.ndim == 3 else -1
    expected = {
        "boxes": (boxes, (B, N, 4)),
        "target_boxes": (target_boxes, (B, M, 4)),
        "box_valid": (box_valid, (B, M)),
        "target_labels": (target_labels, (B, M, Q)),
        "query_valid": (query_valid, (B, Q)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"detection_loss: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                f"(B={B}, N={N} predictions, Q={Q} query slots, M={M} target rows)"
            )
