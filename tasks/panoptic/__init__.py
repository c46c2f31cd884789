"""UViM-style panoptic segmentation (paper Sec. 4; docs/reference.md §10; docs/panoptic.md).

targets.py     COCO panoptic reader (PNG + JSON, checked against each other), UViM's two-channel target with
               canonical instance order, and the COCO panoptic writer for predictions (pq_compute's input)
data.py        the datasets and joint transforms of both stages, and the PQ sweep per patch size (sharded
               across DDP processes, scored on the main one)
vq.py          the stage I vector quantiser: L2-normalised codewords, EMA updates, dead-code re-seeding, code
               dropout, straight-through gradient
stage1.py      the restricted oracle (per-patch one-hot embeddings + image context, ViT encoder, code grid, VQ,
               ViT decoder with image context, per-pixel heads), its loss, logits -> panoptic maps, and
               ``task="panoptic.stage1"`` for the engine
stage2.py      a FlexiViT encoder (any patch size per call) and an autoregressive code decoder (causal
               self-attention, cross-attention to the image tokens, teacher forcing, greedy / temperature
               decoding with a KV cache), with the frozen oracle inside: ``task="panoptic.stage2"``
inference.py   stage II on a user's images (the task's ``predict``): a colour panoptic map at the image's size,
               COCO-panoptic-like segments and a summary
evaluation.py  PQ / SQ / RQ (All, Things, Stuff) of written predictions through panopticapi's pq_compute
"""

from .stage1 import Oracle, oracle_loss, to_panoptic
from .stage2 import CodeDecoder, Stage2, code_loss
from .targets import (
    VOID,
    PanopticDataError,
    PanopticDataset,
    PanopticDataWarning,
    canonical_instances,
    encode_prediction,
    read_coco_panoptic,
    segments_from_prediction,
    write_coco_panoptic,
    write_encoded_panoptic,
)
from .vq import VectorQuantizer, code_dropout

__all__ = [
    "VOID",
    "CodeDecoder",
    "Oracle",
    "Stage2",
    "PanopticDataError",
    "PanopticDataWarning",
    "PanopticDataset",
    "VectorQuantizer",
    "canonical_instances",
    "code_dropout",
    "code_loss",
    "encode_prediction",
    "oracle_loss",
    "read_coco_panoptic",
    "segments_from_prediction",
    "to_panoptic",
    "write_coco_panoptic",
    "write_encoded_panoptic",
]
