"""Contrastive losses of two-tower training, open_clip's implementations set up for the engine's process group.

- ``softmax`` (CLIP, LiT): cross-entropy over the image->text and text->image logits, averaged.
- ``sigmoid`` (SigLIP): a binary logistic loss on every image-text pair, summed over the batch's texts and averaged
  over its images, with a learnable bias.

Data parallel: each rank's features meet every other rank's (global-batch negatives). For softmax, open_clip's
``local_loss`` with ``gather_with_grad``: each rank scores its own rows against all gathered columns, and gradients
flow back through the gather, so DDP's gradient average is exactly the gradient of the global-batch loss. SigLIP
exchanges text features between ranks with gradients (open_clip's ``gather`` variant, which works with gloo too).
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, SigLipLoss

from tasks.common import distributed

LOSSES = ("softmax", "sigmoid")


def contrastive_loss(
    kind: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``kind`` loss of L2-normalised features (B, D) with ``logit_scale`` (the exp'd temperature) and, for
    ``sigmoid``, ``logit_bias``; matching pairs share a row index. Computed in float32."""
    rank, world = distributed.rank(), distributed.world_size()
    image_features, text_features = image_features.float(), text_features.float()
    if kind == "softmax":
        loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        return loss(image_features, text_features, logit_scale.float())
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit bias: build the model with bias_init (model.loss)")
        loss = SigLipLoss(rank=rank, world_size=world, dist_impl="gather")
        return loss(image_features, text_features, logit_scale.float(), logit_bias.float())
    raise ValueError(f"unknown contrastive loss {kind!r}; use one of {', '.join(LOSSES)}")
