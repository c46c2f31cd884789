"""Segmenter's linear decoder on a FlexiViT backbone (paper Sec. 4; Strudel et al. 2021; docs/reference.md §9).

How a dense head reads the backbone, for every dense task here: the backbone returns ``tokens`` (B, N, D), the
patch tokens after the final norm with the class token already dropped, and ``grid`` (gh, gw) for this call; the
head reshapes tokens to the grid (``tasks.common.dense.tokens_to_map``) and never asks the backbone for a patch size
or a stored resolution. Inputs that the patches do not tile are padded to a multiple of the patch size first
(``pad_to_multiple``), as Segmenter does, so no border is dropped; the logits are then cut back (unpadded).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from flexivit.model import FlexiViT, PatchSize
from flexivit.pi_resize import to_2tuple
from tasks.common.dense import pad_to_multiple, tokens_to_map

from .inference import InferenceSettings


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear layer maps every patch token to class logits on the token grid.

    mmsegmentation writes the same head as ``FCNHead(num_convs=0, concat_input=False)``: a 1x1 convolution on the
    token map, which is this linear layer.
    """

    def __init__(self, *, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # Segmenter's initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, K, gh, gw) on the current token grid."""
        return tokens_to_map(self.head(self.dropout(tokens)), grid)


class Segmenter(nn.Module):
    """Backbone + linear decoder: ``forward(images, patch_size=p)`` -> logits (B, K, H, W) at the input size.

    Steps (docs/reference.md §9): pad the input to a multiple of ``p``; encode; decode on the token grid; upsample the
    logits bilinearly to the padded size; cut off the padding. ``inference`` holds the evaluation settings
    (whole image or sliding window, flip, scales), as mmseg's ``test_cfg`` does; see :mod:`.inference`.
    """

    def __init__(
        self,
        *,
        backbone: FlexiViT,
        num_classes: int,
        dropout: float = 0.0,
        inference: InferenceSettings | None = None,
    ):
        super().__init__()
        inference = inference or InferenceSettings()
        # Saved with every training checkpoint (the engine stores ``model.kwargs``): enough to rebuild this model.
        self.kwargs = {
            "backbone": dict(backbone.kwargs),
            "num_classes": num_classes,
            "dropout": dropout,
            "inference": asdict(inference),
        }
        self.backbone = backbone
        self.decoder = LinearDecoder(width=backbone.width, num_classes=num_classes, dropout=dropout)
        self.num_classes = num_classes
        self.inference = inference

    def forward(self, images: torch.Tensor, patch_size: PatchSize | None = None) -> torch.Tensor:
        patch = to_2tuple(self.backbone.patch_size if patch_size is None else patch_size, "patch_size")
        h, w = images.shape[-2:]
        padded = pad_to_multiple(images, patch)
        features = self.backbone.forward_features(padded, patch)
        logits = self.decoder(features["tokens"], features["grid"])  # (B, K, gh, gw)
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]  # (B, K, H, W)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
