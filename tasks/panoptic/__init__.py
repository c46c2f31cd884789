"""UViM-style panoptic segmentation (paper Sec. 4; docs/reference.md §10): work in progress.

What exists so far:

    targets.py   COCO panoptic reader (PNG + JSON, checked against each other), UViM's two-channel target with
                 canonical instance order, and the COCO panoptic writer for predictions (pq_compute's input)
    vq.py        the stage I vector quantiser: L2-normalised codewords, EMA updates, dead-code re-seeding, code
                 dropout, straight-through gradient
    stage1.py    the restricted oracle (per-patch one-hot embeddings + image context, ViT encoder, code grid, VQ,
                 ViT decoder with image context, per-pixel heads), its loss, and logits -> panoptic maps

Not yet: stage II (the FlexiViT encoder and the autoregressive code decoder), the entry point that trains both
stages, and the PQ sweep (issue 12).
"""

from .targets import (
    VOID,
    PanopticDataError,
    PanopticDataset,
    canonical_instances,
    read_coco_panoptic,
    segments_from_prediction,
    write_coco_panoptic,
)
from .vq import VectorQuantizer, code_dropout

__all__ = [
    "VOID",
    "PanopticDataError",
    "PanopticDataset",
    "VectorQuantizer",
    "canonical_instances",
    "code_dropout",
    "read_coco_panoptic",
    "segments_from_prediction",
    "write_coco_panoptic",
]
