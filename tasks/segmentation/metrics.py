"""Semantic segmentation metrics from a confusion matrix: per-class IoU and accuracy, mIoU, mAcc, aAcc.

The definitions are mmsegmentation's ``IoUMetric`` (tested against it when mmseg is installed): pixels labelled
``ignore_index`` are left out; per class, IoU = intersection / union and Acc = intersection / labelled pixels; a class
with an empty union (for IoU) or no labelled pixels (for Acc) is NaN and left out of the means; aAcc is the fraction
of all labelled pixels predicted correctly. Values are fractions in [0, 1] (mmseg reports percentages).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class, over pixels not labelled ``ignore_index``.

    A label outside ``[0, K)`` other than ``ignore_index`` is an error (a wrong label map), not silently skipped.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    target, prediction = target[valid].long(), prediction[valid].long()
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = sorted(set(target[(target < 0) | (target >= num_classes)].unique().tolist()))
        raise ValueError(f"labels {bad[:10]} are outside 0..{num_classes - 1} and are not the ignore index")
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """``aAcc``, ``mIoU``, ``mAcc`` (floats) and per-class ``IoU`` / ``Acc`` (dicts by class name, NaN if undefined)."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    labelled, predicted = confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - intersection
    iou = intersection / union  # 0 / 0 = NaN: a class that is neither labelled nor predicted
    acc = intersection / labelled
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    return {
        "aAcc": (intersection.sum() / labelled.sum()).item(),
        "mIoU": iou.nanmean().item(),
        "mAcc": acc.nanmean().item(),
        "IoU": dict(zip(names, iou.tolist(), strict=True)),
        "Acc": dict(zip(names, acc.tolist(), strict=True)),
    }
