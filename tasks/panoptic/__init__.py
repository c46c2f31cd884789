"""UViM-style panoptic segmentation (paper Sec. 4; docs/reference.md §10): work in progress.

What exists so far:

    targets.py   COCO panoptic reader (PNG + JSON, checked against each other), UViM's two-channel target with
                 canonical instance order, and the COCO panoptic writer for predictions (pq_compute's input)
    vq.py        the stage I vector quantiser: L2-normalised codewords, EMA updates, dead-code re-seeding, code
                 dropout, straight-through gradient
    stage1.py    the restricted oracle (per-patch one-hot embeddings + image context, ViT encoder, code grid, VQ,
                 ViT decoder with image context, per-pixel heads), its loss, and logits -> panoptic maps
    stage2.py    a FlexiViT encoder (any patch size per call) and an autoregressive code decoder (causal self-attention,
                 cross-attention to the image tokens, teacher forcing, greedy / temperature decoding with a KV cache)

    evaluation.py  PQ / SQ / RQ (All, Things, Stuff) of written predictions through panopticapi's pq_compute

Not yet: the entry point that trains both stages on the engine's pieces, the PQ sweep per patch size and the
embedded demo (issue 12).
"""

from .stage1 import Oracle, oracle_loss, to_panoptic
from .stage2 import CodeDecoder, Stage2, code_loss
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
    "CodeDecoder",
    "Oracle",
    "Stage2",
    "PanopticDataError",
    "PanopticDataset",
    "VectorQuantizer",
    "canonical_instances",
    "code_dropout",
    "code_loss",
    "oracle_loss",
    "read_coco_panoptic",
    "segments_from_prediction",
    "to_panoptic",
    "write_coco_panoptic",
]
