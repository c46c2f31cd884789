"""FlexiViT as an mmsegmentation backbone (mmseg 1.x): a random patch size per training iteration, a fixed one at test.

In an mmseg config:

    custom_imports = dict(imports=["tasks.mmseg_backbone"], allow_failed_imports=False)
    model = dict(backbone=dict(type="FlexiViTBackbone", name="flexivit_small", pretrained="flexivit_s_i1k",
                               train_patch_sizes=[48, 40, 30, 24, 20, 16, 15, 12, 10, 8], test_patch_size=16), ...)

The training patch size is drawn from ``(seed, iteration)`` with the iteration read from mmengine's MessageHub (set
before every training iteration, identical on all ranks, restored on resume), so data-parallel ranks agree, as the
paper requires. The output is one feature map (B, D, h, w) for a linear ``FCNHead(num_convs=0)`` (Segmenter-Linear):

- when the patch size divides the input, the token grid itself (exactly Segmenter's linear decoder after mmseg's
  bilinear upsampling of the logits);
- otherwise the input is padded to a multiple of the patch size (Segmenter's rule), the token grid is upsampled to
  1/4 of the padded size and cropped to the unpadded quarter-resolution area. A linear head commutes with bilinear
  upsampling, so this is Segmenter's "logits on the grid -> upsample to the padded size -> unpad", but with the final
  upsampling split into two bilinear steps (grid -> 1/4 here, 1/4 -> full in mmseg).

mmseg is imported here, so import this module only where mmseg is installed (tools/install_mmseg.sh).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmengine.logging import MessageHub
from mmengine.model import BaseModule
from mmseg.registry import MODELS

import flexivit
from flexivit.pi_resize import to_2tuple
from tasks.common.dense import dense_backbone, pad_to_multiple, tokens_to_map


@MODELS.register_module()
class FlexiViTBackbone(BaseModule):
    """A registered FlexiViT whose final-norm patch tokens are returned as a feature map."""

    def __init__(
        self,
        name: str = "flexivit_small",
        pretrained: str | None = None,
        overrides: dict | None = None,
        train_patch_sizes: Sequence[int] = flexivit.PAPER_PATCH_SIZES,
        test_patch_size: int | Sequence[int] = 16,
        seed: int = 0,
        out_stride: int = 4,
        init_cfg=None,
    ):
        super().__init__(init_cfg)
        self.vit = dense_backbone(name, pretrained, overrides)  # None when load_from replaces every weight
        self.sampler = flexivit.UniformSampler(train_patch_sizes, seed=seed)
        self.test_patch_size = to_2tuple(test_patch_size, "test_patch_size")
        self.out_stride = out_stride

    def init_weights(self) -> None:
        # The FlexiViT initialises (or loads) itself; mmengine's default init would overwrite the pretrained weights.
        pass

    def current_patch_size(self) -> tuple[int, int]:
        if not self.training:
            return self.test_patch_size
        iteration = MessageHub.get_current_instance().get_info("iter", 0)
        return to_2tuple(self.sampler(iteration))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        patch = self.current_patch_size()
        height, width = images.shape[-2:]
        padded = pad_to_multiple(images, patch)  # Segmenter's rule, shared with tasks.segmentation
        out = self.vit.forward_features(padded, patch_size=patch)
        features = tokens_to_map(out["tokens"], out["grid"])  # (B, D, gh, gw)
        if padded.shape[-2:] != images.shape[-2:]:
            s = self.out_stride
            up = (math.ceil(padded.shape[-2] / s), math.ceil(padded.shape[-1] / s))
            features = F.interpolate(features, size=up, mode="bilinear", align_corners=False)
            features = features[..., : math.ceil(height / s), : math.ceil(width / s)]
        return (features,)
